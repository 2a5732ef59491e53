"""Evaluate a FER+ model on one split folder in Microsoft's layout (``label.csv`` plus PNGs).

The computation matches the per-epoch validation of ``examples/finetune_ferplus.py``:
the same decoding (:func:`~transfer_timm.data.create_eval_transform` from the model's
own data config), the same normalisation, the argmax of the logits in eval mode, and
:func:`~transfer_timm.training.metrics.metrics_from_confusion`. Evaluating an exported
model on its validation folder therefore reproduces the accuracy in its model card.
"""
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from timm.data import resolve_data_config

from ..data import FERPLUS_CLASSES, DataError, create_eval_transform, load_ferplus_split, normalize
from ..data.cache import decode_to_tensors
from ..models import create_pretrained
from .metrics import confusion_matrix, metrics_from_confusion

_logger = logging.getLogger(__name__)

__all__ = ['evaluate_split', 'load_model']


def load_model(spec: str) -> nn.Module:
    """Create a model with pretrained weights from a timm spec.

    ``spec`` is a registered ``name.tag`` or ``name``, ``local-dir:PATH`` (an export
    folder) or ``hf-hub:ORG/NAME``. Importing this package has already registered the
    TransFER and IR architectures with timm.
    """
    return create_pretrained(spec)


def _label_names(model: nn.Module) -> List[str]:
    """Return the model's class names in output order, checked against the FER+ classes."""
    num_classes = getattr(model, 'num_classes', None)
    if num_classes != len(FERPLUS_CLASSES):
        raise ValueError(
            f'FER+ evaluation needs a model with {len(FERPLUS_CLASSES)} outputs ({", ".join(FERPLUS_CLASSES)}), '
            f'but this model has num_classes={num_classes}. Evaluate a FER+ checkpoint, or create the model '
            f'with num_classes={len(FERPLUS_CLASSES)} and fine-tune it on FER+ first.'
        )
    pretrained_cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = pretrained_cfg.get('label_names')
    if not names:
        _logger.warning(
            'The model has no label_names in its pretrained_cfg; assuming the FER+ output order %s.',
            ', '.join(FERPLUS_CLASSES),
        )
        return list(FERPLUS_CLASSES)
    if isinstance(names, dict):
        # timm allows {class index: name}. FER+ models have no gaps, so the names are ordered by index.
        names = [names[k] for k in sorted(names, key=int)]
    names = [str(name) for name in names]
    if sorted(names) != sorted(FERPLUS_CLASSES):
        raise ValueError(
            f'The model\'s label_names {names} are not the FER+ classes {list(FERPLUS_CLASSES)}, so its outputs '
            f'cannot be matched to FER+ labels. Evaluate a model trained on FER+.'
        )
    return names


def _remap_labels(labels: torch.Tensor, label_names: Sequence[str]) -> torch.Tensor:
    """Map labels in FER+ order to the model's output order (the identity for FER+ models)."""
    if list(label_names) == list(FERPLUS_CLASSES):
        return labels
    order = torch.tensor([list(label_names).index(name) for name in FERPLUS_CLASSES], dtype=labels.dtype)
    return order[labels]


def evaluate_split(
        model_or_spec: Union[str, nn.Module],
        data_dir: Union[str, os.PathLike],
        label_mode: str = 'majority',
        batch_size: int = 256,
        device: Union[str, torch.device] = 'cpu',
        skip_bad: bool = False,
        show_progress: bool = False,
) -> Dict:
    """Measure the accuracy of a FER+ model on one split folder.

    Args:
        model_or_spec: A timm model, or a spec for :func:`load_model` (``name.tag``,
            ``name``, ``local-dir:PATH``, ``hf-hub:ORG/NAME``). A model object is moved
            to ``device`` and switched to eval mode.
        data_dir: A split folder such as ``FER2013Valid``, holding ``label.csv`` and the PNGs.
        label_mode: FER+ label mode that selects the images and gives each its label
            (the top class of its target).
        batch_size: Images per forward pass.
        device: Device to run the model on.
        skip_bad: Skip malformed label rows and unreadable images, counting them in the
            log, instead of raising :class:`~transfer_timm.data.DataError`.
        show_progress: Show a progress bar while decoding the images.

    Returns:
        The keys of :func:`~transfer_timm.training.metrics.metrics_from_confusion`
        (``accuracy``, ``mean_class_accuracy``, ``per_class_recall`` by label name,
        ``n``, ``confusion_matrix`` with rows as true labels in ``label_names`` order)
        plus ``label_names``, ``model``, ``data_dir`` and ``label_mode``.

    Raises:
        ValueError: The model does not have the 8 FER+ outputs, or ``batch_size`` is not positive.
        DataError: The folder or ``label.csv`` is missing or invalid, or no image has a
            label in ``label_mode``.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size}.')
    if isinstance(model_or_spec, str):
        model_name = model_or_spec
        model = load_model(model_or_spec)
    else:
        model = model_or_spec
        model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
    label_names = _label_names(model)

    data_dir = Path(data_dir)
    dataset = load_ferplus_split(data_dir, label_mode, skip_bad=skip_bad)
    if len(dataset) == 0:
        raise DataError(f'{data_dir}: no image has a valid {label_mode!r} label, so there is nothing to evaluate.')
    data_config = resolve_data_config(model=model)
    images, labels, _ = decode_to_tensors(dataset, create_eval_transform(data_config), show_progress=show_progress)
    labels = _remap_labels(labels, label_names)

    # NOTE: the training example validates under accelerator.autocast(), which is a no-op
    # without mixed precision. A card measured with --mixed_precision bf16 or fp16 can
    # differ from this float32 evaluation in the last few predictions.
    num_classes = len(label_names)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    model = model.to(device).eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            logits = model(normalize(batch, data_config['mean'], data_config['std']))
            matrix += confusion_matrix(logits.argmax(dim=1), labels[start:start + batch_size], num_classes)

    result = metrics_from_confusion(matrix, label_names)
    result.update(label_names=list(label_names), model=model_name, data_dir=str(data_dir), label_mode=label_mode)
    return result
