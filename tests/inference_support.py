"""Helpers shared by the inference tests: FER+ faces, test canvases and a local model export."""
import json
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import transfer_timm  # noqa: F401  (registers the models with timm)

FERPLUS_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'ferplus'
VALID_DIR = FERPLUS_DIR / 'FER2013Valid'

# FER+ validation faces that OpenCV's default Haar cascade finds when they are
# upscaled to 150-200 px on a grey canvas (checked by the canvas tests).
DETECTABLE_FACES = (
    'fer0028638.png', 'fer0028640.png', 'fer0028641.png', 'fer0028642.png', 'fer0028643.png', 'fer0028644.png',
)


def require_ferplus() -> Path:
    """Return the FER+ validation folder, or skip the test when the data set is absent."""
    if not all((VALID_DIR / name).is_file() for name in DETECTABLE_FACES):
        pytest.skip(f'FER+ validation images not found under {VALID_DIR}, and these tests need real faces.')
    return VALID_DIR


def load_face(name: str, size: int) -> Image.Image:
    """Load a 48x48 FER+ face and upscale it to ``size`` pixels (grayscale)."""
    with Image.open(require_ferplus() / name) as img:
        return img.convert('L').resize((size, size), Image.BICUBIC)


def make_canvas(
        names: Sequence[str], sizes: Sequence[int], gap: int = 50, background: int = 128,
) -> Tuple[Image.Image, List[Tuple[int, int, int, int]]]:
    """Paste upscaled faces side by side in rows of three on a grey RGB canvas.

    Returns the canvas and each face's ``(x, y, w, h)`` in paste order.
    """
    per_row = 3
    cell = max(sizes) + gap
    rows = (len(names) + per_row - 1) // per_row
    canvas = Image.new('RGB', (gap + per_row * cell, gap + rows * cell), (background,) * 3)
    boxes = []
    for i, (name, size) in enumerate(zip(names, sizes)):
        row, col = divmod(i, per_row)
        x, y = gap + col * cell, gap + row * cell
        canvas.paste(load_face(name, size).convert('RGB'), (x, y))
        boxes.append((x, y, size, size))
    return canvas, boxes


def create_test_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    """Create a randomly initialised ``transfer_tiny`` whose classifier is not zero.

    The architecture starts its classifier at zero, which would make every
    prediction uniform, so the classifier gets random weights here.
    """
    torch.manual_seed(seed)
    model = timm.create_model('transfer_tiny', **kwargs)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model.eval()


def save_local_export(model: torch.nn.Module, directory: Path, label_names: Sequence[str] = None) -> Path:
    """Save ``model`` as a folder that ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads.

    Follows the layout of ``timm.models._hub.save_for_hf``: ``model.safetensors``
    with the state dict, and ``config.json`` with the architecture, class count and
    the pretrained config, whose ``label_names`` give the class order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / 'model.safetensors'))
    cfg = model.pretrained_cfg
    pretrained_cfg = {
        key: cfg[key] for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode',
                                  'first_conv', 'classifier', 'fixed_input_size')
        if cfg.get(key) is not None
    }
    pretrained_cfg['num_classes'] = model.num_classes
    pretrained_cfg['label_names'] = list(label_names or cfg['label_names'])
    config = {
        'architecture': cfg['architecture'],
        'num_classes': model.num_classes,
        'num_features': model.num_features,
        'pretrained_cfg': pretrained_cfg,
    }
    (directory / 'config.json').write_text(json.dumps(config, indent=2), encoding='utf-8')
    return directory
