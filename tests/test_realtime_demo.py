"""examples/realtime_demo.py: headless annotated video, face tracking and smoothing, help text."""
import argparse
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference_support import DETECTABLE_FACES, create_test_model, make_canvas, save_local_export
from transfer_timm.inference import FacePrediction

DEMO_PATH = Path(__file__).resolve().parents[1] / 'examples' / 'realtime_demo.py'
LABELS = ('a', 'b', 'c')


@pytest.fixture(scope='module')
def demo():
    spec = importlib.util.spec_from_file_location('realtime_demo', DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def model_spec(tmp_path_factory):
    folder = save_local_export(create_test_model(seed=0), tmp_path_factory.mktemp('export') / 'model')
    return f'local-dir:{folder}'


@pytest.fixture(scope='module')
def face_video(tmp_path_factory):
    """Eight 10 fps frames with two FER+ faces that drift right by 3 px per frame."""
    image, boxes = make_canvas(DETECTABLE_FACES[:2], (180, 160), gap=40)
    frame = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    path = tmp_path_factory.mktemp('video') / 'faces.avi'
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10.0, (frame.shape[1], frame.shape[0]))
    assert writer.isOpened()
    for i in range(8):
        writer.write(np.roll(frame, 3 * i, axis=1))
    writer.release()
    return path, frame.shape[:2]


def face(box, probabilities):
    probs = dict(zip(LABELS, probabilities))
    best = max(probs, key=probs.get)
    return FacePrediction(box=box, detection_score=1.0, label=best, score=probs[best], probabilities=probs)


def test_headless_writes_annotated_video(demo, model_spec, face_video, tmp_path, capsys):
    source, (height, width) = face_video
    output = tmp_path / 'annotated.mp4'
    status = demo.main(['--source', str(source), '--model', model_spec, '--device', 'cpu', '--headless',
                        '--output', str(output)])
    assert status == 0
    assert 'Processed 8 frames' in capsys.readouterr().out

    annotated = cv2.VideoCapture(str(output))
    assert annotated.isOpened()
    original = cv2.VideoCapture(str(source))
    frames = 0
    while True:
        ok, frame = annotated.read()
        if not ok:
            break
        ok_original, original_frame = original.read()
        assert ok_original
        assert frame.shape == (height, width, 3)
        # The boxes are drawn in green (BGR 0, 200, 0), which a grey frame lacks.
        green = (frame[:, :, 1].astype(int) - frame[:, :, 2].astype(int) > 100).sum()
        assert green > 500, f'frame {frames} has no drawn face box'
        assert np.abs(frame.astype(int) - original_frame.astype(int)).mean() > 1.0
        frames += 1
    annotated.release()
    original.release()
    assert frames == 8


def test_headless_missing_source_fails(demo, model_spec, tmp_path, capsys):
    status = demo.main(['--source', str(tmp_path / 'missing.mp4'), '--model', model_spec, '--headless'])
    assert status == 1
    assert 'not found' in capsys.readouterr().err


def test_smoother_averages_matched_face(demo):
    smoother = demo.ExpressionSmoother(ema_weight=0.25, iou_threshold=0.3)
    first = smoother.update([face((10, 10, 100, 100), (1.0, 0.0, 0.0))])
    second = smoother.update([face((14, 12, 100, 100), (0.0, 1.0, 0.0))])
    assert first[0].track_id == second[0].track_id
    np.testing.assert_allclose(second[0].probabilities, [0.75, 0.25, 0.0])
    assert second[0].box == (14, 12, 100, 100)


def test_smoother_separates_distant_faces(demo):
    smoother = demo.ExpressionSmoother(ema_weight=0.5, max_missed=1)
    tracks = smoother.update([face((0, 0, 50, 50), (1, 0, 0)), face((300, 0, 50, 50), (0, 0, 1))])
    assert len({track.track_id for track in tracks}) == 2
    moved = smoother.update([face((302, 0, 50, 50), (0, 1, 0))])
    assert moved[0].track_id == tracks[1].track_id
    np.testing.assert_allclose(moved[0].probabilities, [0.0, 0.5, 0.5])
    smoother.update([])
    assert [track.track_id for track in smoother.tracks] == [tracks[1].track_id]


def test_box_iou(demo):
    assert demo.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert demo.box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert demo.box_iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0


def test_every_argument_has_sentence_help(demo):
    for action in demo.build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f'{action.option_strings} has no help'
        assert action.help.rstrip().endswith('.'), f'{action.option_strings} help is not a full sentence'
