"""Shared names and helpers for the model tests."""
import timm
import torch

import transfer_timm  # noqa: F401  (registers the models with timm)

TRANSFER_MODELS = timm.list_models('transfer_*')
IR_MODELS = timm.list_models('ir*')
ALL_MODELS = TRANSFER_MODELS + IR_MODELS

# Every registered model accepts this img_size: it is divisible by the TransFER stem
# reduction (8) and leaves a 2x2 map after the four IR stages (reduction 16).
SMALL_IMG_SIZE = 32


def create_small(name: str, **kwargs) -> torch.nn.Module:
    """Create a registered model at ``SMALL_IMG_SIZE`` so that CPU checks stay fast."""
    kwargs.setdefault('img_size', SMALL_IMG_SIZE)
    return timm.create_model(name, **kwargs)


def small_input(model: torch.nn.Module, batch_size: int = 2, img_size: int = SMALL_IMG_SIZE) -> torch.Tensor:
    """Return a random batch with the model's input channels."""
    return torch.randn(batch_size, model.in_chans, img_size, img_size)
