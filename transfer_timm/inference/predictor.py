"""Expression prediction for every face in an image.

:class:`FacePredictor` loads a timm model, finds faces with a detector from
:mod:`.detect`, crops each face with a margin and classifies the crops with the
model's own evaluation transform (:func:`transfer_timm.data.create_eval_transform`
followed by :func:`transfer_timm.data.normalize`, the same pair that training and
evaluation use). Faces from several images share one batch.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image

from transfer_timm.data import create_eval_transform, image_mode_for, normalize, to_model_mode
from transfer_timm.models import FERPLUS_LABEL_NAMES, create_pretrained

from .detect import FaceBox, FaceDetector, clip_box, create_detector
from .images import IMAGE_READ_ERRORS, load_image, to_pil_image

_logger = logging.getLogger(__name__)

__all__ = [
    'FacePrediction', 'FacePredictor', 'ImageInput', 'ImagePrediction', 'label_names_for', 'load_model',
]

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass
class FacePrediction:
    """One classified face.

    ``box`` is ``(x, y, w, h)`` in pixels of the upright image, clipped to it.
    ``probabilities`` maps every label to its softmax probability, in the model's
    output order, and ``label``/``score`` are its maximum.
    """

    box: Tuple[int, int, int, int]
    detection_score: float
    label: str
    score: float
    probabilities: Dict[str, float]

    def to_dict(self, digits: int = 6) -> Dict[str, Any]:
        return {
            'box': list(self.box),
            'detection_score': round(self.detection_score, digits),
            'label': self.label,
            'score': round(self.score, digits),
            'probabilities': {name: round(p, digits) for name, p in self.probabilities.items()},
        }


@dataclass
class ImagePrediction:
    """Result for one image or video frame: its faces, largest first, or the reason it failed.

    ``width`` and ``height`` are those of the upright image. ``frame_index`` and
    ``timestamp`` (seconds) are set for video frames only.
    """

    source: str
    faces: List[FacePrediction] = field(default_factory=list)
    width: Optional[int] = None
    height: Optional[int] = None
    error: Optional[str] = None
    frame_index: Optional[int] = None
    timestamp: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, digits: int = 6) -> Dict[str, Any]:
        record: Dict[str, Any] = {'source': self.source}
        if self.frame_index is not None:
            record['frame_index'] = self.frame_index
        if self.timestamp is not None:
            record['timestamp'] = round(self.timestamp, 3)
        record['width'] = self.width
        record['height'] = self.height
        record['faces'] = [face.to_dict(digits) for face in self.faces]
        record['error'] = self.error
        return record


@dataclass
class ImageInput:
    """An image together with the name and video position that its record carries.

    ``color_order`` applies to colour numpy arrays only ('RGB' or 'BGR').
    """

    image: ImageLike
    source: Optional[str] = None
    color_order: Optional[str] = None
    frame_index: Optional[int] = None
    timestamp: Optional[float] = None


def _describe_read_error(path: str, error: Exception) -> str:
    """Return a one-line error record for an image file that could not be read."""
    if isinstance(error, FileNotFoundError):
        return f'Image {path} not found. Check the path.'
    if isinstance(error, IsADirectoryError):
        return f'{path} is a folder, not an image. Pass the folder itself to predict every image inside it.'
    if isinstance(error, Image.UnidentifiedImageError):
        return f'{path} is not a readable image (unknown image format). Pass a JPEG, PNG or other Pillow format.'
    return f'{path} is not a readable image ({type(error).__name__}: {error}). Re-export or replace the file.'


def load_model(spec: str, pretrained: bool = True) -> nn.Module:
    """Create a timm model from a name, ``name.tag``, ``local-dir:PATH`` or ``hf-hub:ID``.

    A plain registered name (no tag, no source prefix) whose default configuration has
    no weights is created randomly initialised with a warning, which is useful for
    tests only. Every other spec must resolve to weights.
    """
    if pretrained:
        source, name = timm.models.parse_model_name(spec)
        architecture, tag = timm.models.split_model_name_tag(name)
        if source is None and not tag and timm.models.is_model(architecture):
            cfg = timm.models.get_pretrained_cfg(architecture)
            if cfg is None or not cfg.has_weights:
                warnings.warn(
                    f'Model {spec!r} has no pretrained weights, so it is randomly initialised '
                    f'and its predictions are meaningless. Pass a tagged name, local-dir:PATH or hf-hub:ID '
                    f'for a trained model.',
                    stacklevel=2,
                )
                pretrained = False
    if not pretrained:
        return timm.create_model(spec, pretrained=False)
    return create_pretrained(spec)


def label_names_for(model: nn.Module, num_classes: Optional[int] = None) -> List[str]:
    """Return the class names in output order.

    Uses ``model.pretrained_cfg['label_names']`` (a sequence, or a mapping from class
    index to name), falling back to the FER+ names for 8 classes and to ``class_N``.
    """
    if num_classes is None:
        num_classes = getattr(model, 'num_classes', None)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('label_names')
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i))) for i in range(len(names))]
    if names is not None and num_classes is not None and len(names) == num_classes and all(names):
        return [str(name) for name in names]
    if names is not None:
        warnings.warn(
            f'Ignoring label_names of length {len(names)} for a model with {num_classes} classes.', stacklevel=2,
        )
    if num_classes == len(FERPLUS_LABEL_NAMES):
        return list(FERPLUS_LABEL_NAMES)
    if num_classes is None:
        raise ValueError('The model has no num_classes attribute. Pass label_names explicitly.')
    return [f'class_{i}' for i in range(num_classes)]


class FacePredictor:
    """Find faces in images and classify the expression of each.

    Example::

        predictor = FacePredictor('transfer_tiny.ferplus')
        result = predictor.predict('photo.jpg')
        for face in result.faces:
            print(face.box, face.label, face.score)
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            detector: Union[str, FaceDetector, None] = 'haar',
            detector_model: Optional[Union[str, os.PathLike]] = None,
            device: Union[str, torch.device, None] = None,
            batch_size: int = 32,
            margin: float = 0.1,
            max_faces: Optional[int] = None,
            data_config: Optional[Dict[str, Any]] = None,
            label_names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            model: A model spec for :func:`load_model` or a model object.
            detector: 'haar', 'yunet', 'none' (each input is one face crop), or a detector object.
                None is the same as 'none'.
            detector_model: File for the detector: the YuNet ONNX file, or another Haar cascade XML.
            device: Torch device for the model. None picks CUDA when available, else CPU.
            batch_size: Faces per forward pass. Faces from consecutive images share a batch.
            margin: Context added on each side of a detected box, as a fraction of its width and height.
            max_faces: Number of largest faces kept per image. None keeps all.
            data_config: Overrides the config from ``timm.data.resolve_data_config(model=model)``.
            label_names: Overrides the class names from :func:`label_names_for`.
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
        if margin < 0:
            raise ValueError(f'margin must be non-negative, got {margin}.')
        if max_faces is not None and max_faces < 1:
            raise ValueError(f'max_faces must be at least 1 or None, got {max_faces}.')

        if isinstance(model, str):
            self.model_name = model
            model = load_model(model)
        else:
            self.model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        if device is None:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

        self.data_config = dict(data_config or timm.data.resolve_data_config(model=model))
        # timm resolves the data config from the pretrained config, which keeps its channel
        # count when create_model(..., in_chans=N) changes the model's.
        model_channels = getattr(model, 'in_chans', None)
        if model_channels is not None and model_channels != self.data_config['input_size'][0]:
            raise ValueError(
                f'The model reads {model_channels} channels but its data config has input_size '
                f'{tuple(self.data_config["input_size"])}. Pass data_config with the matching input_size, mean and std.'
            )
        self.transform = create_eval_transform(self.data_config)
        self.image_mode = image_mode_for(self.data_config['input_size'])
        self.label_names = list(label_names) if label_names is not None else label_names_for(model)

        if detector is None or isinstance(detector, str):
            detector = create_detector(detector or 'none', detector_model)
        self.detector = detector
        self.batch_size = batch_size
        self.margin = margin
        self.max_faces = max_faces

    # Steps of one prediction, public so that callers can check or reuse them.

    def detect(self, image: Image.Image) -> List[Tuple[Tuple[int, int, int, int], float]]:
        """Return ``(box, detection_score)`` per face of an upright PIL image, largest first.

        Boxes are clipped to the image and at most ``max_faces`` are kept.
        """
        rgb = np.asarray(to_model_mode(image, 'RGB'))
        faces: List[FaceBox] = self.detector.detect(rgb)
        boxes = [(clip_box(face, image.width, image.height), float(face.score)) for face in faces]
        boxes.sort(key=lambda item: item[0][2] * item[0][3], reverse=True)
        if self.max_faces is not None:
            boxes = boxes[:self.max_faces]
        return boxes

    def crop_faces(self, image: Image.Image, boxes: Sequence[Tuple[int, int, int, int]]) -> List[Image.Image]:
        """Crop each box, widened by ``margin`` and clipped to the image, in the model's colour mode."""
        converted = to_model_mode(image, self.image_mode)
        crops = []
        for x, y, w, h in boxes:
            dx, dy = self.margin * w, self.margin * h
            left, top, width, height = clip_box((x - dx, y - dy, w + 2 * dx, h + 2 * dy), image.width, image.height)
            crops.append(converted.crop((left, top, left + width, top + height)))
        return crops

    def preprocess(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        """Turn face crops into the model's normalised float input batch ``(B, C, H, W)``."""
        batch = torch.stack([self.transform(crop) for crop in crops])
        return normalize(batch, self.data_config['mean'], self.data_config['std'])

    @torch.inference_mode()
    def classify(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        """Return the class probabilities ``(len(crops), num_classes)`` of face crops, on the CPU."""
        if not crops:
            return torch.empty(0, len(self.label_names))
        probabilities = []
        for start in range(0, len(crops), self.batch_size):
            batch = self.preprocess(crops[start:start + self.batch_size]).to(self.device)
            logits = self.model(batch)
            probabilities.append(logits.float().softmax(dim=-1).cpu())
        return torch.cat(probabilities)

    # Whole-image prediction.

    def predict(self, image: Union[ImageLike, ImageInput], color_order: Optional[str] = None) -> ImagePrediction:
        """Predict every face of one image.

        ``image`` is a file path, PIL image, numpy array or :class:`ImageInput`.
        ``color_order`` ('RGB' or 'BGR') is needed for colour numpy arrays. A file that
        cannot be read gives a record whose ``error`` names the path and the reason.
        """
        return next(self.iter_predict([image], color_order=color_order))

    def predict_many(
            self, images: Iterable[Union[ImageLike, ImageInput]], color_order: Optional[str] = None,
    ) -> List[ImagePrediction]:
        """Predict every face of several images, one record per image in input order."""
        return list(self.iter_predict(images, color_order=color_order))

    def iter_predict(
            self, images: Iterable[Union[ImageLike, ImageInput]], color_order: Optional[str] = None,
    ) -> Iterator[ImagePrediction]:
        """Yield one record per image in input order, reading the input lazily.

        Images are held only until their faces fill a batch of ``batch_size`` (or
        ``batch_size`` images without faces are waiting), so memory stays bounded for
        long streams such as video frames. Unreadable files give error records and
        never stop the iteration. Invalid in-memory images (for example a colour array
        without ``color_order``) raise ``ValueError`` or ``TypeError``.
        """
        pending: List[Tuple[ImagePrediction, List[Tuple[int, int, int, int]], List[float], List[Image.Image]]] = []
        num_faces = 0
        for item in images:
            entry = self._prepare(item, color_order)
            pending.append(entry)
            num_faces += len(entry[3])
            if num_faces >= self.batch_size or len(pending) >= self.batch_size:
                yield from self._finish(pending)
                pending, num_faces = [], 0
        yield from self._finish(pending)

    def _prepare(self, item: Union[ImageLike, ImageInput], color_order: Optional[str]):
        if not isinstance(item, ImageInput):
            item = ImageInput(item, color_order=color_order)
        order = item.color_order or color_order
        record = ImagePrediction(
            source=item.source or _describe_source(item.image), frame_index=item.frame_index,
            timestamp=item.timestamp,
        )
        if isinstance(item.image, (str, os.PathLike)):
            try:
                image = load_image(item.image)
            except IMAGE_READ_ERRORS as e:
                record.error = _describe_read_error(os.fspath(item.image), e)
                _logger.warning(record.error)
                return record, [], [], []
        else:
            image = to_pil_image(item.image, order)

        record.width, record.height = image.width, image.height
        detections = self.detect(image)
        boxes = [box for box, _ in detections]
        scores = [score for _, score in detections]
        return record, boxes, scores, self.crop_faces(image, boxes)

    def _finish(self, pending) -> Iterator[ImagePrediction]:
        crops = [crop for entry in pending for crop in entry[3]]
        probabilities = self.classify(crops).tolist()
        offset = 0
        for record, boxes, scores, image_crops in pending:
            for box, detection_score in zip(boxes, scores):
                probs = probabilities[offset]
                offset += 1
                best = max(range(len(probs)), key=probs.__getitem__)
                record.faces.append(FacePrediction(
                    box=box,
                    detection_score=detection_score,
                    label=self.label_names[best],
                    score=probs[best],
                    probabilities=dict(zip(self.label_names, probs)),
                ))
            yield record

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(model={self.model_name!r}, detector={self.detector!r}, '
                f'device={str(self.device)!r}, batch_size={self.batch_size}, margin={self.margin}, '
                f'max_faces={self.max_faces})')


def _describe_source(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return f'<PIL.Image mode={image.mode} size={image.width}x{image.height}>'
    if isinstance(image, np.ndarray):
        return f'<numpy.ndarray shape={tuple(image.shape)} dtype={image.dtype}>'
    return f'<{type(image).__name__}>'
