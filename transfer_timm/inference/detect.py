"""Face detectors that find the boxes the expression model classifies.

Every detector takes an RGB ``uint8`` array of shape ``(H, W, 3)`` and returns
:class:`FaceBox` tuples ``(x, y, w, h, score)`` in pixels of that array. Boxes may
reach past the image border, because a face cut by the border is still reported
with its full extent. :func:`clip_box` clips them.
"""
import math
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Protocol, Tuple, Union, runtime_checkable

import cv2
import numpy as np

__all__ = [
    'DETECTOR_NAMES', 'FaceBox', 'FaceDetector', 'HaarFaceDetector', 'WholeImageDetector', 'YuNetFaceDetector',
    'clip_box', 'create_detector',
]

DETECTOR_NAMES = ('haar', 'yunet', 'none')


class FaceBox(NamedTuple):
    """Detected face: top-left corner, width and height in pixels, and detector confidence."""

    x: float
    y: float
    w: float
    h: float
    score: float


@runtime_checkable
class FaceDetector(Protocol):
    """Anything with a ``detect`` method that maps an RGB uint8 image to face boxes."""

    def detect(self, image_rgb: np.ndarray) -> List[FaceBox]:
        ...


def clip_box(box: Tuple[float, float, float, float], width: int, height: int) -> Tuple[int, int, int, int]:
    """Round ``(x, y, w, h)`` outward to whole pixels and clip it to a ``width`` x ``height`` image.

    The result has at least one pixel in each direction, so a box that lies fully
    outside the image collapses onto the nearest edge pixel.
    """
    x, y, w, h = box[:4]
    left = min(max(int(math.floor(x)), 0), width - 1)
    top = min(max(int(math.floor(y)), 0), height - 1)
    right = max(min(int(math.ceil(x + w)), width), left + 1)
    bottom = max(min(int(math.ceil(y + h)), height), top + 1)
    return left, top, right - left, bottom - top


def _check_image(image_rgb: np.ndarray) -> None:
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 \
            or image_rgb.shape[2] != 3:
        shape = getattr(image_rgb, 'shape', None)
        dtype = getattr(image_rgb, 'dtype', type(image_rgb).__name__)
        raise ValueError(f'Face detectors take an RGB uint8 array of shape (H, W, 3), got shape {shape} and {dtype}.')


def _detection_scale(height: int, width: int, min_side: int, max_side: int) -> float:
    """Return the resize factor that brings the longer side to at most ``max_side`` and,
    where that allows, the shorter side to at least ``min_side``."""
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
    elif min(height, width) < min_side:
        scale = min(min_side / min(height, width), max_side / max(height, width))
    return scale


def _resize_for_detection(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


class HaarFaceDetector:
    """Frontal face detector with OpenCV's Viola-Jones Haar cascade.

    Images whose longer side exceeds ``max_side`` are downscaled for detection, and
    images whose shorter side is below ``min_side`` are upscaled, which lets the
    24 px cascade window find faces in small images. Boxes are scaled back to the
    input's pixels. The cascade has no calibrated confidence, so ``score`` is the
    logistic function of the last stage's weight: it ranks boxes but is not a
    probability.
    """

    def __init__(
            self,
            cascade_path: Optional[Union[str, os.PathLike]] = None,
            scale_factor: float = 1.1,
            min_neighbors: int = 5,
            min_face_fraction: float = 0.04,
            min_side: int = 160,
            max_side: int = 1280,
    ):
        """
        Args:
            cascade_path: Cascade XML file. None selects OpenCV's ``haarcascade_frontalface_default.xml``.
            scale_factor: Step between the scales of the detection window.
            min_neighbors: Overlapping raw detections that a box needs to be kept. Higher values give fewer false faces.
            min_face_fraction: Smallest face side, as a fraction of the shorter image side (at least 24 px).
            min_side: Images with a shorter side below this many pixels are upscaled for detection.
            max_side: Images with a longer side above this many pixels are downscaled for detection.
        """
        if cascade_path is None:
            cascade_path = Path(cv2.data.haarcascades) / 'haarcascade_frontalface_default.xml'
        cascade_path = Path(cascade_path)
        if not cascade_path.is_file():
            raise FileNotFoundError(f'Haar cascade file not found: {cascade_path}.')
        self.cascade = cv2.CascadeClassifier(str(cascade_path))
        if self.cascade.empty():
            raise ValueError(f'OpenCV failed to load the Haar cascade {cascade_path}. Pass a cascade XML file.')
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_fraction = min_face_fraction
        self.min_side = min_side
        self.max_side = max_side

    def detect(self, image_rgb: np.ndarray) -> List[FaceBox]:
        _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        scale = _detection_scale(height, width, self.min_side, self.max_side)
        gray = cv2.cvtColor(_resize_for_detection(image_rgb, scale), cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)
        min_face = max(24, int(self.min_face_fraction * min(gray.shape)))
        rects, _, weights = self.cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_face, min_face),
            outputRejectLevels=True,
        )
        boxes = []
        for (x, y, w, h), weight in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            score = 1.0 / (1.0 + math.exp(-float(weight)))
            boxes.append(FaceBox(x / scale, y / scale, w / scale, h / scale, score))
        return boxes

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(scale_factor={self.scale_factor}, min_neighbors={self.min_neighbors}, '
                f'min_face_fraction={self.min_face_fraction}, min_side={self.min_side}, max_side={self.max_side})')


class YuNetFaceDetector:
    """CNN face detector YuNet through ``cv2.FaceDetectorYN`` (OpenCV 4.8 or newer).

    OpenCV ships no YuNet weights, so ``model_path`` must name a downloaded ONNX file,
    for example ``face_detection_yunet_2023mar.onnx`` from the OpenCV model zoo.
    Large images are downscaled to ``max_side`` for detection and boxes scaled back.
    """

    def __init__(
            self,
            model_path: Union[str, os.PathLike],
            score_threshold: float = 0.7,
            nms_threshold: float = 0.3,
            top_k: int = 5000,
            max_side: int = 1280,
    ):
        """
        Args:
            model_path: YuNet ONNX file.
            score_threshold: Minimum face confidence in [0, 1].
            nms_threshold: IoU above which non-maximum suppression merges two boxes.
            top_k: Candidates kept before non-maximum suppression.
            max_side: Images with a longer side above this many pixels are downscaled for detection.
        """
        if model_path is None:
            raise ValueError('The YuNet detector needs a model file. Pass the path of a YuNet ONNX file.')
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(
                f'YuNet model file not found: {model_path}. Download face_detection_yunet_2023mar.onnx from the '
                f'OpenCV model zoo (github.com/opencv/opencv_zoo) and pass its path.'
            )
        if not hasattr(cv2, 'FaceDetectorYN'):
            raise RuntimeError(f'OpenCV {cv2.__version__} has no FaceDetectorYN. YuNet needs OpenCV 4.8 or newer.')
        try:
            self.detector = cv2.FaceDetectorYN.create(str(model_path), '', (320, 320), score_threshold,
                                                      nms_threshold, top_k)
        except cv2.error as e:
            raise ValueError(f'OpenCV failed to load the YuNet model {model_path}: {e}') from e
        self.model_path = model_path
        self.max_side = max_side

    def detect(self, image_rgb: np.ndarray) -> List[FaceBox]:
        _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        scale = _detection_scale(height, width, 0, self.max_side)
        bgr = cv2.cvtColor(_resize_for_detection(image_rgb, scale), cv2.COLOR_RGB2BGR)
        self.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self.detector.detect(bgr)
        if faces is None:
            return []
        # Each row: box (4), five landmarks (10), score.
        return [FaceBox(row[0] / scale, row[1] / scale, row[2] / scale, row[3] / scale, float(row[14]))
                for row in faces]

    def __repr__(self) -> str:
        return f'{type(self).__name__}(model_path={str(self.model_path)!r}, max_side={self.max_side})'


class WholeImageDetector:
    """Detector for inputs that are already face crops: it returns the whole image as one face."""

    def detect(self, image_rgb: np.ndarray) -> List[FaceBox]:
        _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        return [FaceBox(0.0, 0.0, float(width), float(height), 1.0)]

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def create_detector(name: str = 'haar', model_path: Optional[Union[str, os.PathLike]] = None) -> FaceDetector:
    """Create a detector by name: 'haar' (default), 'yunet' (needs ``model_path``) or 'none' (whole image)."""
    if name == 'haar':
        return HaarFaceDetector(cascade_path=model_path)
    if name == 'yunet':
        return YuNetFaceDetector(model_path)
    if name == 'none':
        return WholeImageDetector()
    raise ValueError(f'Unknown face detector {name!r}. Use one of {DETECTOR_NAMES}.')
