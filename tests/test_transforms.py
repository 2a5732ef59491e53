"""Tests of the evaluation transform, normalisation and batch augmentation on real FER+ faces."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import timm.data

from transfer_timm.data import BatchAugment, create_eval_transform, normalize
from transfer_timm.data.transforms import PHOTOMETRIC_OPS

from test_data_ferplus import SHARED_VALID, requires_shared, sample_rows

pytestmark = requires_shared

MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.2, 0.3)
# Every augmentation off; tests switch on one at a time.
OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, rotate=0.0, ra_num_ops=0, erase_prob=0.0)


@pytest.fixture(scope='module')
def faces() -> torch.Tensor:
    """16 real FER+ faces as a uint8 batch (16, 3, 48, 48)."""
    images = [np.asarray(Image.open(SHARED_VALID / row[0])) for row in sample_rows()[:16]]
    batch = torch.from_numpy(np.stack(images))[:, None]
    return batch.expand(-1, 3, -1, -1).contiguous()


def test_normalize_matches_torchvision(faces):
    expected = T.Normalize(MEAN, STD)(faces.float() / 255.0)
    torch.testing.assert_close(normalize(faces, MEAN, STD), expected, rtol=0, atol=1e-6)


def test_augment_shape_and_dtype(faces):
    out = BatchAugment(MEAN, STD)(faces)
    assert out.shape == faces.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    gray = BatchAugment(MEAN[:1], STD[:1])(faces[:, :1])
    assert gray.shape == (16, 1, 48, 48)


def test_augment_seeded_runs_repeat(faces):
    augment = BatchAugment(MEAN, STD, erase_prob=0.5)
    torch.manual_seed(3)
    first = augment(faces)
    torch.manual_seed(3)
    second = augment(faces)
    torch.manual_seed(4)
    third = augment(faces)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_augment_all_off_is_identity(faces):
    out = BatchAugment(MEAN, STD, **OFF)(faces)
    assert torch.equal(out, normalize(faces, MEAN, STD))


def test_augment_hflip_exact(faces):
    out = BatchAugment(MEAN, STD, **dict(OFF, hflip=1.0))(faces)
    assert torch.equal(out, normalize(faces.flip(-1), MEAN, STD))


AUGMENTATIONS = {
    'crop': dict(scale=(0.5, 0.7)),
    'aspect': dict(scale=(0.9, 0.9), ratio=(0.7, 0.8)),
    'rotate': dict(rotate=20.0),
    'erase': dict(erase_prob=1.0),
    **{op: dict(ra_num_ops=1, ra_magnitude=9.0, ra_ops=(op,)) for op in PHOTOMETRIC_OPS},
}


@pytest.mark.parametrize('name', list(AUGMENTATIONS))
def test_augment_each_step_changes_images(faces, name):
    torch.manual_seed(0)
    out = BatchAugment(MEAN, STD, **dict(OFF, **AUGMENTATIONS[name]))(faces)
    baseline = normalize(faces, MEAN, STD)
    assert torch.isfinite(out).all()
    changed = (out - baseline).abs().amax(dim=(1, 2, 3)) > 1e-3
    # Posterize keeps all 8 bits for about one draw in seven, so a few samples may stay the same.
    assert changed.sum() >= 12, f'{name} changed only {int(changed.sum())} of 16 images'


def test_augment_rejects_unknown_op():
    with pytest.raises(ValueError, match='ra_ops'):
        BatchAugment(MEAN, STD, ra_ops=('solarize',))


@pytest.fixture(scope='module')
def upscaled_face() -> Image.Image:
    """A real FER+ face resized to a non-square 90x130 (width x height) image."""
    return Image.open(SHARED_VALID / sample_rows()[5][0]).resize((90, 130), Image.BICUBIC)


@pytest.mark.parametrize('input_size, interpolation, crop_pct', [
    ((3, 112, 112), 'bicubic', 0.875),
    ((3, 112, 112), 'bilinear', 1.0),
    ((3, 112, 96), 'bilinear', 0.9),
])
def test_eval_transform_matches_timm(upscaled_face, input_size, interpolation, crop_pct):
    data_config = dict(input_size=input_size, interpolation=interpolation, crop_pct=crop_pct, mean=MEAN, std=STD)
    ours = create_eval_transform(data_config)(upscaled_face)
    assert ours.dtype == torch.uint8
    assert tuple(ours.shape) == input_size

    expected = timm.data.create_transform(**data_config)(upscaled_face.convert('RGB'))
    torch.testing.assert_close(normalize(ours[None], MEAN, STD)[0], expected, rtol=0, atol=1e-6)


def test_eval_transform_grayscale_model(upscaled_face):
    data_config = dict(input_size=(1, 64, 64), interpolation='bilinear', crop_pct=1.0, mean=(0.5,), std=(0.5,))
    ours = create_eval_transform(data_config)(upscaled_face.convert('RGB'))
    assert tuple(ours.shape) == (1, 64, 64)
    expected = timm.data.create_transform(**data_config)(upscaled_face)
    torch.testing.assert_close(normalize(ours[None], (0.5,), (0.5,))[0], expected, rtol=0, atol=1e-6)
