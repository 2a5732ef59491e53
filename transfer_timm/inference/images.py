"""Reading images from files, PIL objects and numpy arrays for face prediction."""
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ['COLOR_ORDERS', 'IMAGE_READ_ERRORS', 'array_to_pil', 'load_image', 'to_pil_image']

COLOR_ORDERS = ('RGB', 'BGR')

# Exceptions that Pillow raises for missing, unreadable, corrupt, truncated or
# oversized image files. A file that raises one of these gets an error record.
IMAGE_READ_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Decode an image file completely and rotate it upright by its EXIF orientation tag.

    Raises one of :data:`IMAGE_READ_ERRORS` for a missing, empty, truncated or
    non-image file. The returned image keeps the file's mode (for example 'I;16',
    'CMYK' or 'P'), which :func:`transfer_timm.data.to_model_mode` converts.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        # Pillow reports an empty file as an unidentified format, like a text file.
        raise OSError('the file is empty (0 bytes)')
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def array_to_pil(array: np.ndarray, color_order: Optional[str] = None) -> Image.Image:
    """Convert an image array to a PIL image without losing bit depth or transparency.

    Accepted shapes are ``(H, W)`` and ``(H, W, 1)`` (grayscale), ``(H, W, 3)`` and
    ``(H, W, 4)`` (colour, the last with alpha). Colour arrays need ``color_order``,
    'RGB' or 'BGR' (as OpenCV returns them), because the array alone cannot tell.
    Accepted types are uint8, uint16 (scaled to 8 bits, not clipped), bool and float
    in [0, 1].
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f'Expected a numpy array, got {type(array).__name__}.')
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f'Image arrays must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}.')
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f'Image array is empty: shape {array.shape}.')

    array = _to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array, mode='L')

    if color_order is None:
        raise ValueError(
            f'A colour image array of shape {array.shape} needs color_order: pass color_order="RGB", '
            f'or "BGR" for arrays from OpenCV.'
        )
    color_order = color_order.upper()
    if color_order not in COLOR_ORDERS:
        raise ValueError(f'Unknown color_order {color_order!r}. Use one of {COLOR_ORDERS}.')
    if color_order == 'BGR':
        # Swap the first and third channels, keeping alpha in place.
        array = array[:, :, [2, 1, 0, 3][:array.shape[2]]]
    mode = 'RGB' if array.shape[2] == 3 else 'RGBA'
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError('Float image array contains NaN or infinite values.')
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f'Float image arrays must hold values in [0, 1], got [{low:g}, {high:g}]. '
                f'Convert 0-255 data to uint8 first.'
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(f'Unsupported image array dtype {array.dtype}. Use uint8, uint16, bool or float in [0, 1].')


def to_pil_image(image: Union[Image.Image, np.ndarray], color_order: Optional[str] = None) -> Image.Image:
    """Return ``image`` as a PIL image: PIL images pass through, arrays go through :func:`array_to_pil`."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return array_to_pil(image, color_order)
    raise TypeError(f'Expected a file path, PIL image or numpy array, got {type(image).__name__}.')
