"""Creation of pretrained models from the model specs that timm accepts."""
from pathlib import Path

import timm
from torch import nn

__all__ = ['check_local_dir', 'create_pretrained']

LOCAL_DIR_PREFIX = 'local-dir:'


def check_local_dir(spec: str) -> None:
    """Raise ``FileNotFoundError`` if a ``local-dir:PATH`` spec names no export folder.

    timm reports a missing folder as a missing config file, which hides a mistyped path.
    Specs without the ``local-dir:`` prefix pass unchecked.
    """
    if not spec.startswith(LOCAL_DIR_PREFIX):
        return
    folder = Path(spec[len(LOCAL_DIR_PREFIX):]).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f'Model folder {folder} not found (from {spec!r}). Pass local-dir: followed by the path '
            f'of an export folder that contains config.json and model.safetensors.'
        )
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(
            f'{folder} contains no config.json, so it is not a model export folder. Point local-dir: '
            f'at the folder written by the fine-tuning example or transfer_timm.training.export_model.'
        )


def create_pretrained(spec: str, **kwargs) -> nn.Module:
    """Create a model with pretrained weights from ``name.tag``, ``local-dir:PATH`` or ``hf-hub:ID``.

    Keyword arguments go to ``timm.create_model``.
    """
    check_local_dir(spec)
    return timm.create_model(spec, pretrained=True, **kwargs)
