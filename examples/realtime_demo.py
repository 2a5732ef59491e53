"""Real-time facial expression recognition on a webcam or a video file.

Draws a box per face with its expression and confidence, and the processing rate in
frames per second. Probabilities are smoothed per face over frames: each face is
matched to the previous frame's faces by box overlap (IoU), and its probabilities are
an exponential moving average, so the label does not flicker between frames.

Examples::

    python examples/realtime_demo.py                      # webcam 0, in a window
    python examples/realtime_demo.py --source clip.mp4 --headless --output annotated.mp4

Opening a window needs an OpenCV build with GUI support (opencv-python, not
opencv-python-headless); ``--headless`` works with both.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from transfer_timm.inference import FacePrediction, FacePredictor, ImageInput, iter_video_frames

DEFAULT_MODEL = 'transfer_tiny.ferplus'
WINDOW_NAME = 'TransFER expressions'


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Return the intersection over union of two ``(x, y, w, h)`` boxes."""
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    intersection = max(0.0, right - left) * max(0.0, bottom - top)
    union = a[2] * a[3] + b[2] * b[3] - intersection
    return intersection / union if union > 0 else 0.0


@dataclass
class FaceTrack:
    """A face followed over frames, with its smoothed class probabilities."""

    track_id: int
    box: Tuple[int, int, int, int]
    probabilities: np.ndarray
    missed: int = 0


class ExpressionSmoother:
    """Match each frame's faces to earlier faces by IoU and smooth their probabilities.

    A face whose best unmatched track overlaps it with IoU of at least ``iou_threshold``
    updates that track: ``p = ema_weight * p_new + (1 - ema_weight) * p_old``. Other faces
    start new tracks, and tracks unmatched for more than ``max_missed`` updates are dropped.
    """

    def __init__(self, ema_weight: float = 0.4, iou_threshold: float = 0.3, max_missed: int = 5):
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError(f'ema_weight must be in (0, 1], got {ema_weight}.')
        self.ema_weight = ema_weight
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.tracks: List[FaceTrack] = []
        self._next_id = 0

    def update(self, faces: Sequence[FacePrediction]) -> List[FaceTrack]:
        """Update the tracks with one frame's faces and return the tracks seen in this frame."""
        # Greedy matching: the pair with the highest IoU first, each track and face used once.
        pairs = []
        for t, track in enumerate(self.tracks):
            for f, face in enumerate(faces):
                pairs.append((box_iou(track.box, face.box), t, f))
        pairs.sort(reverse=True)
        matched_tracks, matched_faces = set(), set()
        current: Dict[int, FaceTrack] = {}
        for iou, t, f in pairs:
            if iou < self.iou_threshold:
                break
            if t in matched_tracks or f in matched_faces:
                continue
            track = self.tracks[t]
            new = np.asarray(list(faces[f].probabilities.values()), dtype=np.float64)
            track.probabilities = self.ema_weight * new + (1.0 - self.ema_weight) * track.probabilities
            track.box = faces[f].box
            track.missed = 0
            matched_tracks.add(t)
            matched_faces.add(f)
            current[f] = track

        for t, track in enumerate(self.tracks):
            if t not in matched_tracks:
                track.missed += 1
        self.tracks = [track for track in self.tracks if track.missed <= self.max_missed]

        for f, face in enumerate(faces):
            if f not in matched_faces:
                track = FaceTrack(self._next_id, face.box, np.asarray(list(face.probabilities.values()), np.float64))
                self._next_id += 1
                self.tracks.append(track)
                current[f] = track
        return [current[f] for f in range(len(faces))]


def draw_annotations(
        frame_bgr: np.ndarray, tracks: Sequence[FaceTrack], label_names: Sequence[str], fps: Optional[float],
) -> None:
    """Draw a box, label and confidence per track, and the frame rate, onto a BGR frame in place."""
    scale = max(0.4, min(frame_bgr.shape[:2]) / 600)
    thickness = max(1, round(2 * scale))
    for track in tracks:
        x, y, w, h = track.box
        best = int(np.argmax(track.probabilities))
        text = f'{label_names[best]} {track.probabilities[best]:.2f}'
        cv2.rectangle(frame_bgr, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), thickness)
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, thickness)
        text_top = max(0, y - text_h - baseline - 4)
        cv2.rectangle(frame_bgr, (x, text_top), (x + text_w + 4, text_top + text_h + baseline + 4), (0, 200, 0), -1)
        cv2.putText(frame_bgr, text, (x + 2, text_top + text_h + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
    if fps is not None:
        cv2.putText(frame_bgr, f'{fps:.1f} FPS', (8, int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale,
                    (0, 0, 255), thickness, cv2.LINE_AA)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Show facial expressions on a webcam or video file, smoothed over frames per face.',
    )

    parser.add_argument(
        '--source', default='0',
        help='Webcam index (an integer such as 0) or the path of a video file. Default: 0.',
    )
    parser.add_argument(
        '--model', default=DEFAULT_MODEL,
        help=f'Model to load: a timm name with pretrained tag, local-dir:PATH or hf-hub:ID. Default: {DEFAULT_MODEL}.',
    )
    parser.add_argument(
        '--detector', choices=('haar', 'yunet'), default='haar',
        help='Face detector: the OpenCV Haar cascade, or YuNet, which needs --detector-model. Default: haar.',
    )
    parser.add_argument('--detector-model', help='The YuNet ONNX file when --detector is yunet.')
    parser.add_argument(
        '--device', help='Torch device for the model, for example cpu or cuda:0. Default: cuda if available, else cpu.',
    )

    parser.add_argument(
        '--ema-weight', type=float, default=0.4,
        help='Weight of the newest frame in the moving average of probabilities, in (0, 1]. '
             'Smaller values smooth more, and 1 turns smoothing off. Default: 0.4.',
    )
    parser.add_argument(
        '--iou-threshold', type=float, default=0.3,
        help='Minimum box overlap (IoU) for a face to count as the same face as in an earlier frame. Default: 0.3.',
    )

    parser.add_argument(
        '--frame-stride', type=int, default=1,
        help='Classify every N-th frame and redraw the last results on the frames between. Default: 1.',
    )
    parser.add_argument(
        '--max-frames', type=int,
        help='Stop after this many frames. Default: run until the video ends or the window is closed.',
    )

    parser.add_argument(
        '--headless', action='store_true',
        help='Open no window. With --output it writes the annotated video on machines without a display, '
             'and without it it only measures the frame rate.',
    )
    parser.add_argument(
        '--output',
        help='Write the annotated video to this file (MP4 with the mp4v codec). Default: write no file.',
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frame_stride < 1:
        parser.error(f'--frame-stride must be at least 1, got {args.frame_stride}.')
    if not 0.0 < args.ema_weight <= 1.0:
        parser.error(f'--ema-weight must be in (0, 1], got {args.ema_weight}.')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    source = int(args.source) if args.source.isdigit() else args.source
    predictor = FacePredictor(args.model, detector=args.detector, detector_model=args.detector_model,
                              device=args.device)
    smoother = ExpressionSmoother(ema_weight=args.ema_weight, iou_threshold=args.iou_threshold)

    fps_source = 0.0
    if not isinstance(source, int):
        capture = cv2.VideoCapture(str(source))
        fps_source = capture.get(cv2.CAP_PROP_FPS)
        capture.release()

    writer = None
    tracks: List[FaceTrack] = []
    fps: Optional[float] = None
    frames = 0
    last_time = time.perf_counter()
    try:
        for frame in iter_video_frames(source, max_frames=args.max_frames):
            if frame.index % args.frame_stride == 0:
                result = predictor.predict(ImageInput(frame.image, color_order='RGB'))
                tracks = smoother.update(result.faces)

            now = time.perf_counter()
            rate = 1.0 / max(now - last_time, 1e-6)
            fps = rate if fps is None else 0.9 * fps + 0.1 * rate
            last_time = now

            bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
            draw_annotations(bgr, tracks, predictor.label_names, fps)

            if args.output:
                if writer is None:
                    height, width = bgr.shape[:2]
                    writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*'mp4v'), fps_source or 30.0,
                                             (width, height))
                    if not writer.isOpened():
                        print(f'error: failed to open {args.output} for writing with the mp4v codec.', file=sys.stderr)
                        return 1
                writer.write(bgr)
            if not args.headless:
                try:
                    cv2.imshow(WINDOW_NAME, bgr)
                    key = cv2.waitKey(1) & 0xFF
                except cv2.error as e:
                    print(f'error: failed to open a window ({e}). Run with --headless --output FILE instead.',
                          file=sys.stderr)
                    return 1
                if key in (ord('q'), 27):
                    break
            frames += 1
    except OSError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        if writer is not None:
            writer.release()
        if not args.headless:
            _close_windows()

    if frames == 0:
        print(f'error: no frame could be read from {args.source}.', file=sys.stderr)
        return 1
    print(f'Processed {frames} frames at {fps:.1f} frames per second.')
    return 0


def _close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass  # OpenCV builds without GUI support have no windows to close.


if __name__ == '__main__':
    sys.exit(main())
