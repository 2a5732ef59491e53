"""ONNX export of expression models, with a dynamic batch axis, and its check with onnxruntime.

The exported graph maps the normalised float input ``(batch, C, H, W)`` named
``input`` to the logits ``(batch, num_classes)`` named ``logits``. Preprocessing is
not part of the graph: apply :func:`transfer_timm.data.create_eval_transform` and
:func:`transfer_timm.data.normalize`, whose settings are stored in the model's
metadata properties (``input_size``, ``mean``, ``std``, ``interpolation``,
``crop_pct``, ``label_names``, all JSON).
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import timm
import torch
import torch.nn as nn

from .predictor import label_names_for, load_model

_logger = logging.getLogger(__name__)

__all__ = ['DEFAULT_OPSET', 'OnnxCheckError', 'export_onnx', 'onnx_metadata', 'verify_onnx']

# The torch.export-based exporter of PyTorch 2.14 implements opset 18. It converts
# requests for lower opsets with ONNX's version converter, which may fail.
DEFAULT_OPSET = 18


class OnnxCheckError(RuntimeError):
    """An exported ONNX model disagrees with its PyTorch model."""


def onnx_metadata(model: nn.Module, data_config: Dict[str, Any]) -> Dict[str, str]:
    """Return the preprocessing settings and class names of a model as ONNX metadata properties."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {
        'architecture': str(cfg.get('architecture', type(model).__name__)),
        'input_size': json.dumps(list(data_config['input_size'])),
        'mean': json.dumps(list(data_config['mean'])),
        'std': json.dumps(list(data_config['std'])),
        'interpolation': str(data_config.get('interpolation', 'bilinear')),
        'crop_pct': json.dumps(data_config.get('crop_pct', 1.0)),
        'label_names': json.dumps(label_names_for(model)),
    }


def export_onnx(
        model: Union[str, nn.Module],
        output_path: Union[str, os.PathLike],
        opset: int = DEFAULT_OPSET,
        dynamo: bool = True,
) -> Path:
    """Export a model (spec or object) to ONNX with a dynamic batch axis and return the file path.

    Args:
        model: A model spec for :func:`~transfer_timm.inference.predictor.load_model` or a model object.
            The model is exported in eval mode on the CPU.
        output_path: The ``.onnx`` file to write. Its parent folder is created if missing.
        opset: ONNX opset version.
        dynamo: Use the ``torch.export``-based exporter (default since PyTorch 2.9). False selects
            the deprecated TorchScript exporter.
    """
    if isinstance(model, str):
        model = load_model(model)
    model = model.cpu().eval()
    data_config = timm.data.resolve_data_config(model=model)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)

    # A batch of 2 keeps the exporter from specialising the batch axis to the constant 1.
    example = torch.randn(2, *data_config['input_size'])
    export_args = dict(input_names=['input'], output_names=['logits'], opset_version=opset)
    if dynamo:
        # Weights stay inside the file unless they exceed the 2 GB protobuf limit, in
        # which case the exporter moves them to a side file by itself.
        batch = torch.export.Dim('batch', min=1)
        torch.onnx.export(
            model, (example,), str(output_path), dynamo=True, dynamic_shapes=({0: batch},),
            external_data=False, verbose=False, **export_args,
        )
    else:
        torch.onnx.export(
            model, (example,), str(output_path), dynamo=False,
            dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}}, **export_args,
        )
    _add_metadata(output_path, onnx_metadata(model, data_config))
    _logger.info('Exported a model with input size %s to %s (opset %d).', data_config['input_size'], output_path, opset)
    return output_path


def _add_metadata(path: Path, metadata: Dict[str, str]) -> None:
    import onnx

    # Load without external weights so that only the graph file is rewritten.
    proto = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def verify_onnx(
        model: nn.Module,
        onnx_path: Union[str, os.PathLike],
        batch_sizes: Sequence[int] = (1, 3),
        atol: float = 1e-4,
        seed: int = 0,
) -> float:
    """Check an exported file with the ONNX checker and compare onnxruntime with PyTorch.

    Runs random normal inputs of each batch size through both and returns the largest
    absolute logit difference. Raises :class:`OnnxCheckError` when it exceeds ``atol``
    or an output shape differs, which also catches a batch axis that did not stay dynamic.
    """
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(onnx_path))
    model = model.cpu().eval()
    input_size = timm.data.resolve_data_config(model=model)['input_size']
    session = onnxruntime.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *input_size, generator=generator)
        with torch.inference_mode():
            expected = model(x).numpy()
        actual = session.run(None, {input_name: x.numpy()})[0]
        if actual.shape != expected.shape:
            raise OnnxCheckError(
                f'ONNX output shape {actual.shape} differs from PyTorch {expected.shape} at batch size {batch_size}.'
            )
        diff = float(np.abs(actual - expected).max())
        if diff > atol:
            raise OnnxCheckError(
                f'ONNX logits differ from PyTorch by {diff:.3g} (> {atol:g}) at batch size {batch_size}.'
            )
        max_diff = max(max_diff, diff)
    return max_diff
