"""`transfer-fer predict` on folders of good and broken files, and the parser layout."""
import csv
import io
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from inference_support import DETECTABLE_FACES, create_test_model, load_face, make_canvas, save_local_export
from transfer_timm.cli import DEFAULT_MODEL, SUBCOMMANDS, build_parser, main
from transfer_timm.models import FERPLUS_LABEL_NAMES


@pytest.fixture(scope='module')
def model_spec(tmp_path_factory):
    folder = save_local_export(create_test_model(seed=0), tmp_path_factory.mktemp('export') / 'model')
    return f'local-dir:{folder}'


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    """A folder tree with two photos of faces, three broken image files and a file to ignore."""
    root = tmp_path_factory.mktemp('photos')
    (root / 'nested' / 'deeper').mkdir(parents=True)
    three_faces, _ = make_canvas(DETECTABLE_FACES[:3], (190, 180, 170))
    three_faces.save(root / 'group.png')
    one_face, _ = make_canvas(DETECTABLE_FACES[3:4], (180,), gap=40)
    one_face.save(root / 'nested' / 'deeper' / 'portrait_ünïcode.jpg', quality=95)

    encoded = io.BytesIO()
    one_face.save(encoded, format='PNG')
    (root / 'truncated.png').write_bytes(encoded.getvalue()[:2000])
    (root / 'nested' / 'zero.png').write_bytes(b'')
    (root / 'notes.jpg').write_text('this is text, not a JPEG', encoding='utf-8')
    (root / 'README.txt').write_text('not an image extension, so the folder scan skips it', encoding='utf-8')
    return root


def read_records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_with_broken_files(model_spec, photo_folder, capsys, caplog):
    status = main(['predict', str(photo_folder), '--model', model_spec, '--device', 'cpu'])
    captured = capsys.readouterr()
    assert status == 0
    records = {rec['source']: rec for rec in read_records(captured.out)}
    good = {
        str(photo_folder / 'group.png'): 3,
        str(photo_folder / 'nested' / 'deeper' / 'portrait_ünïcode.jpg'): 1,
    }
    bad = [photo_folder / 'truncated.png', photo_folder / 'nested' / 'zero.png', photo_folder / 'notes.jpg']
    assert len(records) == len(good) + len(bad)
    for source, num_faces in good.items():
        assert records[source]['error'] is None
        assert len(records[source]['faces']) == num_faces
        face = records[source]['faces'][0]
        assert list(face['probabilities']) == list(FERPLUS_LABEL_NAMES)
        assert face['label'] in FERPLUS_LABEL_NAMES
    for path in bad:
        record = records[str(path)]
        assert record['faces'] == []
        assert str(path) in record['error']
    assert '3 of 5 inputs could not be processed' in caplog.text


def test_all_inputs_failing_exit_nonzero(model_spec, photo_folder, capsys):
    status = main(['predict', str(photo_folder / 'notes.jpg'), str(photo_folder / 'nested' / 'zero.png'),
                   '--model', model_spec])
    captured = capsys.readouterr()
    assert status != 0
    assert len(read_records(captured.out)) == 2
    assert 'No input could be processed' in captured.err


def test_console_script_exit_status(model_spec, photo_folder):
    executable = shutil.which('transfer-fer')
    command = [executable] if executable else [sys.executable, '-m', 'transfer_timm.cli']
    completed = subprocess.run(
        [*command, 'predict', str(photo_folder / 'notes.jpg'), '--model', model_spec],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1
    assert json.loads(completed.stdout)['error']


def test_empty_folder_exit_nonzero(model_spec, tmp_path, capsys):
    assert main(['predict', str(tmp_path), '--model', model_spec]) != 0
    assert 'No image or video files' in capsys.readouterr().err


def test_unknown_model_exit_nonzero(photo_folder, capsys):
    assert main(['predict', str(photo_folder), '--model', 'transfer_tiny.no_such_tag']) != 0
    assert 'no_such_tag' in capsys.readouterr().err


def test_csv_output_file(model_spec, photo_folder, tmp_path, capsys):
    out = tmp_path / 'predictions.csv'
    status = main(['predict', str(photo_folder / 'group.png'), str(photo_folder / 'notes.jpg'),
                   '--model', model_spec, '--format', 'csv', '--output', str(out)])
    assert status == 0
    assert capsys.readouterr().out == ''
    with out.open(newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [row['face_index'] for row in rows[:3]] == ['0', '1', '2']
    assert rows[0]['label'] in FERPLUS_LABEL_NAMES
    assert sum(float(rows[0][f'prob_{name}']) for name in FERPLUS_LABEL_NAMES) == pytest.approx(1.0, abs=1e-4)
    assert rows[3]['source'] == str(photo_folder / 'notes.jpg')
    assert rows[3]['error']


def test_no_detect_and_max_faces(model_spec, photo_folder, capsys):
    group = str(photo_folder / 'group.png')
    assert main(['predict', group, '--model', model_spec, '--max-faces', '2']) == 0
    assert len(read_records(capsys.readouterr().out)[0]['faces']) == 2
    assert main(['predict', group, '--model', model_spec, '--no-detect']) == 0
    record = read_records(capsys.readouterr().out)[0]
    assert [face['box'] for face in record['faces']] == [[0, 0, record['width'], record['height']]]


def test_video_records_per_sampled_frame(model_spec, tmp_path, capsys):
    image, _ = make_canvas(DETECTABLE_FACES[:1], (170,), gap=30)
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    video = tmp_path / 'clip.avi'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'MJPG'), 5.0, (bgr.shape[1], bgr.shape[0]))
    for _ in range(6):
        writer.write(bgr)
    writer.release()
    broken_video = tmp_path / 'broken.mp4'
    broken_video.write_bytes(b'\x00' * 100)
    face = tmp_path / 'face.png'
    load_face(DETECTABLE_FACES[0], 48).save(face)

    status = main(['predict', str(video), str(broken_video), str(face), '--model', model_spec,
                   '--frame-stride', '2', '--no-detect'])
    assert status == 0
    records = read_records(capsys.readouterr().out)
    frames = [rec for rec in records if rec['source'] == str(video)]
    assert [rec['frame_index'] for rec in frames] == [0, 2, 4]
    assert [rec['timestamp'] for rec in frames] == pytest.approx([0.0, 0.4, 0.8], abs=1e-3)
    assert all(len(rec['faces']) == 1 for rec in frames)
    broken = [rec for rec in records if rec['source'] == str(broken_video)]
    assert len(broken) == 1
    assert broken[0]['error']
    assert records[-1]['source'] == str(face)
    assert 'frame_index' not in records[-1]


def test_parser_subcommands_and_defaults():
    parser = build_parser()
    args = parser.parse_args(['predict', 'a.jpg'])
    assert args.model == DEFAULT_MODEL
    assert args.format == 'json'
    assert args.frame_stride == 1
    assert callable(args.handler)
    args = parser.parse_args(['export-onnx', 'transfer_tiny', 'out.onnx', '--check'])
    assert args.check
    assert callable(args.handler)
    assert [f.__name__ for f in SUBCOMMANDS] == [
        'add_predict_parser', 'add_export_onnx_parser', 'add_evaluate_parser', 'add_convert_parser']


def test_predict_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(['predict', '--help'])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ('--model', '--format', '--output', '--no-detect', '--max-faces', '--device', '--batch-size',
                   '--frame-stride'):
        assert option in help_text
