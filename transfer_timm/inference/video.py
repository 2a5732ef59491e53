"""Frames of video files and webcams, streamed one at a time, and predictions for them."""
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import cv2
import numpy as np

from .predictor import FacePredictor, ImageInput, ImagePrediction

__all__ = [
    'VIDEO_EXTENSIONS', 'VideoFrame', 'count_video_frames', 'is_video_file', 'iter_video_frames', 'open_video',
    'predict_video',
]

# File name extensions treated as video. OpenCV's FFmpeg backend reads all of them.
VIDEO_EXTENSIONS = frozenset({
    '.3gp', '.avi', '.flv', '.m4v', '.mkv', '.mov', '.mp4', '.mpeg', '.mpg', '.ts', '.webm', '.wmv',
})

VideoSource = Union[int, str, os.PathLike]


@dataclass
class VideoFrame:
    """A decoded frame: its index in the stream, time in seconds from the start, RGB uint8 pixels."""

    index: int
    timestamp: float
    image: np.ndarray


def is_video_file(path: Union[str, os.PathLike]) -> bool:
    """Return True if the file name has a video extension from :data:`VIDEO_EXTENSIONS`."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def open_video(source: VideoSource) -> cv2.VideoCapture:
    """Open a video file, or a webcam given by its integer index, and raise ``OSError`` if that fails."""
    if isinstance(source, int):
        capture = cv2.VideoCapture(source)
        description = f'webcam {source}'
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f'Video file not found: {path}.')
        capture = cv2.VideoCapture(str(path))
        description = f'video file {path}'
    if not capture.isOpened():
        capture.release()
        raise OSError(f'OpenCV failed to open {description}. Check that it exists and uses a codec that FFmpeg reads.')
    return capture


def iter_video_frames(
        source: VideoSource, frame_stride: int = 1, max_frames: Optional[int] = None,
) -> Iterator[VideoFrame]:
    """Yield every ``frame_stride``-th frame of a video file or webcam, starting with frame 0.

    Frames are decoded one at a time and skipped frames are grabbed without decoding,
    so memory does not grow with the video's length. File timestamps come from the
    container (``CAP_PROP_POS_MSEC``), or from the frame index and frame rate where the
    container has none. Webcam timestamps are wall-clock seconds since the first frame.
    Iteration stops at the end of the stream, at the first frame that fails to decode,
    or after ``max_frames`` yielded frames.
    """
    if frame_stride < 1:
        raise ValueError(f'frame_stride must be at least 1, got {frame_stride}.')
    if max_frames is not None and max_frames < 1:
        raise ValueError(f'max_frames must be at least 1 or None, got {max_frames}.')
    capture = open_video(source)
    try:
        is_camera = isinstance(source, int)
        fps = capture.get(cv2.CAP_PROP_FPS)
        start = time.monotonic()
        index = 0
        yielded = 0
        while max_frames is None or yielded < max_frames:
            if index % frame_stride:
                if not capture.grab():
                    break
                index += 1
                continue
            ok, bgr = capture.read()
            if not ok:
                break
            if is_camera:
                timestamp = time.monotonic() - start
            else:
                timestamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                if timestamp <= 0.0 and index > 0 and fps > 0:
                    timestamp = index / fps
            yield VideoFrame(index, timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            yielded += 1
            index += 1
    finally:
        capture.release()


def count_video_frames(source: VideoSource) -> Optional[int]:
    """Return the frame count that the container reports, or None for webcams and unknown counts.

    The count is read from the header and may be approximate for some formats.
    """
    if isinstance(source, int):
        return None
    capture = open_video(source)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return count if count > 0 else None


def predict_video(
        predictor: FacePredictor,
        source: VideoSource,
        frame_stride: int = 1,
        max_frames: Optional[int] = None,
) -> Iterator[ImagePrediction]:
    """Yield a record with ``frame_index`` and ``timestamp`` for every sampled frame.

    Frames go through :meth:`FacePredictor.iter_predict`, so faces of consecutive
    frames share batches while memory stays bounded. Raises ``OSError`` if the video
    cannot be opened.
    """
    name = f'webcam:{source}' if isinstance(source, int) else os.fspath(source)
    frames = iter_video_frames(source, frame_stride=frame_stride, max_frames=max_frames)
    inputs = (
        ImageInput(frame.image, source=name, color_order='RGB', frame_index=frame.index, timestamp=frame.timestamp)
        for frame in frames
    )
    return predictor.iter_predict(inputs)
