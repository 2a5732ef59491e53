"""Decode a face dataset once into uint8 tensors at the model's input size."""
import logging
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import datasets

_logger = logging.getLogger(__name__)

__all__ = ['decode_to_tensors']


def decode_to_tensors(
        dataset: datasets.Dataset,
        transform: Callable,
        image_column: str = 'image',
        show_progress: bool = True,
        batch_size: int = 512,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Apply ``transform`` (image -> uint8 ``(C, H, W)`` tensor) to every image of ``dataset``.

    Returns ``(images, labels, soft_labels)``: a uint8 tensor ``(N, C, H, W)``, int64
    labels, and float soft labels ``(N, K)`` when the dataset has a ``soft_label``
    column (else None). FER+ train (25k faces of 48x48) takes about 2 MB per channel
    per thousand faces, 58 MB in all.
    """
    for column in (image_column, 'label'):
        if column not in dataset.column_names:
            raise KeyError(
                f'Dataset has no {column!r} column; available columns: {dataset.column_names}.'
            )
    n = len(dataset)
    if n == 0:
        raise ValueError('Dataset is empty: no images to decode.')
    first = transform(dataset[0][image_column])
    images = torch.empty((n, *first.shape), dtype=torch.uint8)
    progress = tqdm(total=n, desc='Decoding images', unit='img', disable=not show_progress)
    for start in range(0, n, batch_size):
        chunk = dataset[start:start + batch_size][image_column]
        for offset, image in enumerate(chunk):
            tensor = transform(image)
            if tensor.shape != first.shape:
                raise ValueError(
                    f'Image {start + offset} decoded to shape {tuple(tensor.shape)}, expected {tuple(first.shape)}; '
                    f'the transform must produce a fixed size.'
                )
            images[start + offset] = tensor
        progress.update(len(chunk))
    progress.close()
    labels = torch.as_tensor(np.asarray(dataset['label'], dtype=np.int64))
    soft = None
    if 'soft_label' in dataset.column_names:
        soft = torch.as_tensor(np.asarray(dataset['soft_label'], dtype=np.float32))
    return images, labels, soft
