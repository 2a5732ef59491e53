"""Prediction over files, folders and videos, with records written as JSON lines or CSV.

This is the work behind ``transfer-fer predict``: :func:`collect_inputs` expands the
paths, :func:`predict_paths` streams one record per image file or sampled video frame
to a :class:`RecordWriter`.
"""
import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, List, Sequence, Union

from PIL import Image
from tqdm import tqdm

from .predictor import FacePredictor, ImagePrediction
from .video import VIDEO_EXTENSIONS, count_video_frames, is_video_file, predict_video

_logger = logging.getLogger(__name__)

__all__ = [
    'OUTPUT_FORMATS', 'CsvRecordWriter', 'JsonRecordWriter', 'PredictSummary', 'RecordWriter', 'collect_inputs',
    'create_record_writer', 'image_extensions', 'predict_paths',
]

OUTPUT_FORMATS = ('json', 'csv')


def image_extensions() -> frozenset:
    """Return the lower-case file extensions of every image format that Pillow can read, minus video ones."""
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(readable - VIDEO_EXTENSIONS)


def collect_inputs(paths: Iterable[Union[str, os.PathLike]]) -> List[Path]:
    """Expand folders recursively into their image and video files, sorted by path.

    Paths that are not folders are kept as given, whatever their extension or whether
    they exist, so that each one later gets a record (an error record if unreadable).
    Files inside folders are kept only with an image or video extension.
    """
    extensions = image_extensions() | VIDEO_EXTENSIONS
    collected: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in extensions]
            collected.extend(sorted(found))
        else:
            collected.append(path)
    return collected


class RecordWriter:
    """Writes prediction records to a text stream, one record (or one row per face) at a time."""

    def write(self, record: ImagePrediction) -> None:
        raise NotImplementedError


class JsonRecordWriter(RecordWriter):
    """One JSON object per line (JSON Lines), as returned by :meth:`ImagePrediction.to_dict`."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, record: ImagePrediction) -> None:
        self.stream.write(json.dumps(record.to_dict(), ensure_ascii=False) + '\n')
        self.stream.flush()


class CsvRecordWriter(RecordWriter):
    """One CSV row per face, with a ``prob_<label>`` column per class.

    An image without faces, or one that failed, still gets one row with empty face columns.
    """

    def __init__(self, stream: IO[str], label_names: Sequence[str]):
        self.stream = stream
        self.label_names = list(label_names)
        self.columns = [
            'source', 'frame_index', 'timestamp', 'width', 'height', 'face_index', 'x', 'y', 'w', 'h',
            'detection_score', 'label', 'score', *[f'prob_{name}' for name in self.label_names], 'error',
        ]
        self.writer = csv.DictWriter(stream, fieldnames=self.columns, lineterminator='\n')
        self.writer.writeheader()

    def write(self, record: ImagePrediction) -> None:
        data = record.to_dict()
        common = {key: data.get(key) for key in ('source', 'frame_index', 'timestamp', 'width', 'height', 'error')}
        if not data['faces']:
            self.writer.writerow(common)
        for index, face in enumerate(data['faces']):
            x, y, w, h = face['box']
            row = dict(common, face_index=index, x=x, y=y, w=w, h=h, detection_score=face['detection_score'],
                       label=face['label'], score=face['score'])
            row.update({f'prob_{name}': p for name, p in face['probabilities'].items()})
            self.writer.writerow(row)
        self.stream.flush()


def create_record_writer(output_format: str, stream: IO[str], label_names: Sequence[str]) -> RecordWriter:
    """Create the writer for 'json' (JSON Lines) or 'csv'."""
    if output_format == 'json':
        return JsonRecordWriter(stream)
    if output_format == 'csv':
        return CsvRecordWriter(stream, label_names)
    raise ValueError(f'Unknown output format {output_format!r}. Use one of {OUTPUT_FORMATS}.')


@dataclass
class PredictSummary:
    """Counts of written records: ``succeeded`` without error, ``failed`` with one."""

    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.succeeded + self.failed


def predict_paths(
        predictor: FacePredictor,
        paths: Sequence[Union[str, os.PathLike]],
        writer: RecordWriter,
        frame_stride: int = 1,
        progress: bool = True,
) -> PredictSummary:
    """Predict every image file and sampled video frame under ``paths`` and write one record each.

    Folders are expanded by :func:`collect_inputs`, and files with a video extension
    are read as videos, one record per ``frame_stride``-th frame. A file that cannot
    be read gets one error record and the run continues. ``progress`` shows a tqdm bar
    on stderr for runs that last longer than two seconds.
    """
    inputs = collect_inputs(paths)
    total = sum(_count_units(path, frame_stride) for path in inputs)
    summary = PredictSummary()
    with tqdm(total=total, unit='image', disable=not progress, delay=2.0, dynamic_ncols=True) as bar:
        for record in _iter_records(predictor, inputs, frame_stride):
            writer.write(record)
            if record.ok:
                summary.succeeded += 1
            else:
                summary.failed += 1
            bar.update(1)
    return summary


def _count_units(path: Path, frame_stride: int) -> int:
    if not is_video_file(path):
        return 1
    try:
        frames = count_video_frames(path)
    except OSError:
        return 1
    return -(-frames // frame_stride) if frames else 1


def _iter_records(predictor: FacePredictor, inputs: Sequence[Path], frame_stride: int) -> Iterator[ImagePrediction]:
    # Consecutive images go to the predictor together so that their faces share batches.
    images: List[Path] = []
    for path in inputs:
        if not is_video_file(path):
            images.append(path)
            continue
        if images:
            yield from predictor.iter_predict(images)
            images = []
        yield from _iter_video_records(predictor, path, frame_stride)
    if images:
        yield from predictor.iter_predict(images)


def _iter_video_records(predictor: FacePredictor, path: Path, frame_stride: int) -> Iterator[ImagePrediction]:
    frames = 0
    try:
        for record in predict_video(predictor, path, frame_stride=frame_stride):
            frames += 1
            yield record
    except OSError as e:
        error = f'Failed to read video {path}: {e}'
        _logger.warning(error)
        yield ImagePrediction(source=os.fspath(path), error=error)
        return
    if frames == 0:
        error = f'Failed to read video {path}: no frame could be decoded.'
        _logger.warning(error)
        yield ImagePrediction(source=os.fspath(path), error=error)
