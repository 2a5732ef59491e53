"""Face preprocessing shared by training, evaluation and inference.

Images are decoded once into uint8 tensors at the model's input size
(:func:`create_eval_transform`), so an epoch of FER+ costs no image decoding. Training
augmentation then runs on whole batches with tensor operations
(:class:`BatchAugment`), on whatever device the batch is on, and :func:`normalize`
turns uint8 batches into the float input the model expects.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import InterpolationMode

__all__ = [
    'PHOTOMETRIC_OPS', 'BatchAugment', 'FaceEvalTransform', 'create_eval_transform', 'image_mode_for', 'normalize',
    'to_model_mode',
]

_INTERPOLATION = {
    'bilinear': InterpolationMode.BILINEAR,
    'bicubic': InterpolationMode.BICUBIC,
    'nearest': InterpolationMode.NEAREST,
    'lanczos': InterpolationMode.LANCZOS,
    'box': InterpolationMode.BOX,
    'hamming': InterpolationMode.HAMMING,
}

# Photometric operations of BatchAugment, applied in this order when drawn.
PHOTOMETRIC_OPS = ('brightness', 'contrast', 'gamma', 'sharpness', 'posterize')


def image_mode_for(input_size: Sequence[int]) -> str:
    """Return the PIL mode that a model with ``input_size = (C, H, W)`` reads: 'L' or 'RGB'."""
    channels = input_size[0]
    if channels == 1:
        return 'L'
    if channels == 3:
        return 'RGB'
    raise ValueError(f'Face models read 1 or 3 channels, got input_size {tuple(input_size)}.')


def to_model_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to 'L' or 'RGB', compositing transparency onto white and
    scaling 16-bit and float images to 8 bits instead of clipping them."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith('I;16') or img.mode == 'I' else (0.0, 1.0)
        if img.mode == 'I' and arr.max(initial=0) <= 255:
            hi = 255.0
        arr = np.clip(np.round((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode='L')
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'PA'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != mode:
        img = img.convert(mode)
    return img


class FaceEvalTransform:
    """Evaluation transform of a face model, ending in a uint8 ``(C, H, W)`` tensor.

    Converts the image to the model's colour mode, then applies timm's own evaluation
    resize and crop for the same settings (``timm.data.create_transform`` with
    ``use_prefetcher=True``). In timm's default ``center`` crop mode, that resizes the
    shorter side to ``size / crop_pct`` and center crops to ``size``. :func:`normalize`
    completes it.
    """

    def __init__(
            self,
            input_size: Sequence[int],
            interpolation: str = 'bilinear',
            crop_pct: Optional[float] = 1.0,
            crop_mode: Optional[str] = None,
            mean: Optional[Sequence[float]] = None,
    ):
        if interpolation not in _INTERPOLATION:
            raise ValueError(f'Unknown interpolation {interpolation!r}; use one of {sorted(_INTERPOLATION)}.')
        self.mode = image_mode_for(input_size)
        self.size = (int(input_size[1]), int(input_size[2]))
        self.interpolation = _INTERPOLATION[interpolation]
        # timm uses its default crop_pct (0.875) when crop_pct is None.
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        extra = {} if mean is None else {'mean': tuple(mean)}
        self.resize_crop = create_transform(
            tuple(input_size), is_training=False, interpolation=interpolation, crop_pct=crop_pct,
            crop_mode=crop_mode, use_prefetcher=True, **extra,
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.resize_crop(to_model_mode(img, self.mode))

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(mode={self.mode}, size={self.size}, '
                f'interpolation={self.interpolation.value}, crop_pct={self.crop_pct}, crop_mode={self.crop_mode})')


def create_eval_transform(data_config: Dict) -> FaceEvalTransform:
    """Build the uint8 evaluation transform from a timm data config
    (``timm.data.resolve_data_config(model=model)``).

    Its output, after :func:`normalize`, equals ``timm.data.create_transform(**data_config)``
    on the same image converted to the model's colour mode.
    """
    return FaceEvalTransform(
        data_config['input_size'],
        interpolation=data_config.get('interpolation', 'bilinear'),
        crop_pct=data_config.get('crop_pct'),
        crop_mode=data_config.get('crop_mode'),
        mean=data_config.get('mean'),
    )


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale a uint8 or float batch in [0, 255] to float and normalise it per channel."""
    images = images.float() / 255.0
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


class BatchAugment(nn.Module):
    """Face augmentation for a whole batch at once, with a separate draw per sample.

    Steps, in order:

    1. One affine warp that combines a random crop (``scale`` of the area, aspect
       ``ratio``), a horizontal flip with probability ``hflip`` and a rotation of up to
       ``rotate`` degrees. With ``scale`` and ``ratio`` fixed at 1 and no rotation, the
       warp is an exact flip.
    2. ``ra_num_ops`` photometric operations of RandAugment-style magnitude
       ``ra_magnitude`` (out of 10), drawn with replacement from ``ra_ops``. The default
       is all of :data:`PHOTOMETRIC_OPS`: brightness, contrast, gamma, sharpness and
       posterize-like quantisation.
    3. Normalisation with ``mean`` and ``std``.
    4. Random erasing, with probability ``erase_prob``, of one rectangle filled with noise.

    Input: uint8 ``(B, C, H, W)``. Output: normalised float ``(B, C, H, W)``.
    """

    def __init__(
            self,
            mean: Sequence[float],
            std: Sequence[float],
            scale: Tuple[float, float] = (0.8, 1.0),
            ratio: Tuple[float, float] = (0.9, 1.1),
            hflip: float = 0.5,
            rotate: float = 10.0,
            ra_num_ops: int = 2,
            ra_magnitude: float = 5.0,
            erase_prob: float = 0.25,
            erase_scale: Tuple[float, float] = (0.02, 0.25),
            ra_ops: Sequence[str] = PHOTOMETRIC_OPS,
    ):
        super().__init__()
        unknown = [op for op in ra_ops if op not in PHOTOMETRIC_OPS]
        if unknown or not ra_ops:
            raise ValueError(f'ra_ops must be a non-empty subset of {PHOTOMETRIC_OPS}, got {tuple(ra_ops)}.')
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.rotate = rotate
        self.ra_num_ops = ra_num_ops
        self.ra_magnitude = ra_magnitude
        self.erase_prob = erase_prob
        self.erase_scale = erase_scale
        self.ra_ops = tuple(ra_ops)

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        dev = x.device
        if tuple(self.scale) == (1.0, 1.0) and tuple(self.ratio) == (1.0, 1.0) and self.rotate == 0:
            # The warp can only flip, and grid_sample would add rounding error to an exact flip.
            flip = (torch.rand(B, device=dev) < self.hflip).view(B, 1, 1, 1)
            return torch.where(flip, x.flip(-1), x)
        area = torch.empty(B, device=dev).uniform_(*self.scale)
        log_ratio = torch.empty(B, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        sx = torch.sqrt(area * aspect).clamp(max=1.0)
        sy = torch.sqrt(area / aspect).clamp(max=1.0)
        tx = (torch.rand(B, device=dev) * 2 - 1) * (1 - sx)
        ty = (torch.rand(B, device=dev) * 2 - 1) * (1 - sy)
        flip = torch.where(torch.rand(B, device=dev) < self.hflip, -1.0, 1.0)
        angle = (torch.rand(B, device=dev) * 2 - 1) * math.radians(self.rotate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
            torch.stack([sx * sin * flip, sy * cos, ty], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        # x in [0, 1]. Each sample receives ra_num_ops operations drawn with replacement from ra_ops.
        B = x.shape[0]
        dev = x.device
        strength = self.ra_magnitude / 10.0
        num_kinds = len(self.ra_ops)
        counts = torch.zeros(B, num_kinds, device=dev)
        kinds = torch.arange(num_kinds, device=dev)
        for _ in range(self.ra_num_ops):
            # A comparison instead of F.one_hot, whose range check synchronises with a GPU.
            counts += (torch.randint(0, num_kinds, (B, 1), device=dev) == kinds).float()
        drawn = (counts > 0).float()[:, :, None, None, None]
        use = {op: drawn[:, self.ra_ops.index(op)] for op in self.ra_ops}

        sign = lambda: torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, -1.0, 1.0)  # noqa: E731
        if 'brightness' in use:
            factor = 1.0 + sign() * 0.9 * strength * torch.rand(B, 1, 1, 1, device=dev)
            x = torch.lerp(x, x * factor, use['brightness'])
        if 'contrast' in use:
            # Contrast around the per-image mean.
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            factor = 1.0 + sign() * 0.9 * strength * torch.rand(B, 1, 1, 1, device=dev)
            x = torch.lerp(x, (x - mean) * factor + mean, use['contrast'])
        if 'gamma' in use:
            gamma = torch.exp(sign() * 0.7 * strength * torch.rand(B, 1, 1, 1, device=dev))
            x = torch.lerp(x, x.clamp(min=1e-6) ** gamma, use['gamma'])
        if 'sharpness' in use:
            # Blend with a blurred copy.
            kernel = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], device=dev) / 13.0
            kernel = kernel.expand(x.shape[1], 1, 3, 3)
            blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), kernel, groups=x.shape[1])
            factor = 1.0 + sign() * 0.9 * strength * torch.rand(B, 1, 1, 1, device=dev)
            x = torch.lerp(x, blurred + (x - blurred) * factor, use['sharpness'])
        if 'posterize' in use:
            # Quantisation to fewer grey levels.
            bits = 8 - torch.round(4 * strength * torch.rand(B, 1, 1, 1, device=dev))
            levels = 2.0 ** bits
            x = torch.lerp(x, torch.floor(x.clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1), use['posterize'])
        return x.clamp_(0.0, 1.0)

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        dev = x.device
        area = torch.empty(B, device=dev).uniform_(*self.erase_scale) * H * W
        aspect = torch.exp(torch.empty(B, device=dev).uniform_(math.log(0.3), math.log(3.3)))
        h = torch.sqrt(area * aspect).clamp(1, H)
        w = torch.sqrt(area / aspect).clamp(1, W)
        top = torch.rand(B, device=dev) * (H - h)
        left = torch.rand(B, device=dev) * (W - w)
        rows = torch.arange(H, device=dev).view(1, H, 1)
        cols = torch.arange(W, device=dev).view(1, 1, W)
        inside = (rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1)) \
            & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1))
        apply = (torch.rand(B, device=dev) < self.erase_prob).view(B, 1, 1)
        mask = (inside & apply).unsqueeze(1)
        return torch.where(mask, torch.randn_like(x), x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = self._warp(x)
        if self.ra_num_ops > 0 and self.ra_magnitude > 0:
            x = self._photometric(x)
        x = normalize(x * 255.0, self.mean, self.std)
        if self.erase_prob > 0:
            x = self._erase(x)
        return x
