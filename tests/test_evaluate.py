"""Tests for ``evaluate_split``: agreement with a hand-written evaluation and with the
validation of the training example."""
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
from transfer_timm.data import FERPLUS_CLASSES, DataError, votes_to_target
from transfer_timm.training import export_model
from transfer_timm.training.evaluate import evaluate_split

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VALID = REPO_ROOT / 'examples' / 'data' / 'ferplus_sample' / 'FER2013Valid'
METRIC_KEYS = ('accuracy', 'mean_class_accuracy', 'per_class_recall', 'n', 'confusion_matrix')


def _random_tiny_model(seed: int) -> torch.nn.Module:
    """Return transfer_tiny with random weights and a random classifier, so predictions vary."""
    torch.manual_seed(seed)
    model = timm.create_model('transfer_tiny')
    torch.nn.init.normal_(model.head.weight, std=1.0)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model


@pytest.fixture(scope='module')
def split_dir(tmp_path_factory) -> Path:
    """The first 40 rows of the bundled FER2013Valid sample, with their images."""
    out = tmp_path_factory.mktemp('ferplus') / 'FER2013Valid'
    out.mkdir()
    with (SAMPLE_VALID / 'label.csv').open(newline='') as f:
        rows = list(csv.reader(f))[:40]
    with (out / 'label.csv').open('w', newline='') as f:
        csv.writer(f).writerows(rows)
    for row in rows:
        shutil.copyfile(SAMPLE_VALID / row[0], out / row[0])
    return out


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('export') / 'random_tiny'
    return export_model(_random_tiny_model(0), out, FERPLUS_CLASSES)


def _manual_confusion(model: torch.nn.Module, split: Path) -> np.ndarray:
    """Evaluate with PIL and numpy alone: majority labels, pixels scaled to [-1, 1], argmax."""
    images, labels = [], []
    with (split / 'label.csv').open(newline='') as f:
        for row in csv.reader(f):
            target = votes_to_target([int(v) for v in row[2:]], 'majority')
            if target is None:
                continue
            image = Image.open(split / row[0])
            assert image.mode == 'L'
            assert image.size == (48, 48)
            images.append(np.asarray(image, dtype=np.float32) / 255.0)
            labels.append(int(np.argmax(target)))
    inputs = (torch.from_numpy(np.stack(images))[:, None] - 0.5) / 0.5
    with torch.no_grad():
        preds = model.eval()(inputs).argmax(dim=1).numpy()
    matrix = np.zeros((8, 8), dtype=np.int64)
    for label, pred in zip(labels, preds):
        matrix[label, pred] += 1
    return matrix


def _majority_count(split: Path) -> int:
    with (split / 'label.csv').open(newline='') as f:
        return sum(votes_to_target([int(v) for v in row[2:]], 'majority') is not None for row in csv.reader(f))


def test_evaluate_matches_manual_computation(exported, split_dir):
    result = evaluate_split(f'local-dir:{exported}', split_dir)

    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    expected = _manual_confusion(model, split_dir)
    # A model that predicts one class for every face would make this comparison weak.
    assert np.count_nonzero(expected.sum(axis=0)) > 1
    assert result['confusion_matrix'] == expected.tolist()
    assert result['n'] == int(expected.sum())
    assert result['accuracy'] == pytest.approx(np.trace(expected) / expected.sum(), abs=0)
    support = expected.sum(axis=1)
    for i, name in enumerate(FERPLUS_CLASSES):
        if support[i]:
            assert result['per_class_recall'][name] == expected[i, i] / support[i]
        else:
            assert result['per_class_recall'][name] is None


def test_evaluate_reports_inputs(exported, split_dir):
    result = evaluate_split(f'local-dir:{exported}', split_dir)

    assert result['model'] == f'local-dir:{exported}'
    assert result['data_dir'] == str(split_dir)
    assert result['label_mode'] == 'majority'
    assert result['label_names'] == list(FERPLUS_CLASSES)
    assert list(result['per_class_recall']) == list(FERPLUS_CLASSES)


def test_n_counts_majority_images(exported, split_dir):
    result = evaluate_split(f'local-dir:{exported}', split_dir)

    assert result['n'] == _majority_count(split_dir)
    assert result['n'] < 40  # the sample has faces without a majority label
    assert sum(map(sum, result['confusion_matrix'])) == result['n']


def test_evaluate_twice_matches_metrics_json(exported, split_dir, tmp_path):
    first = evaluate_split(f'local-dir:{exported}', split_dir)
    second = evaluate_split(f'local-dir:{exported}', split_dir)
    assert first == second

    # An export that records these metrics reproduces them when evaluated again.
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    card_dir = export_model(model, tmp_path / 'with_metrics', FERPLUS_CLASSES,
                            metrics={k: first[k] for k in METRIC_KEYS})
    recorded = json.loads((card_dir / 'metrics.json').read_text())
    again = evaluate_split(f'local-dir:{card_dir}', split_dir)
    assert {k: again[k] for k in METRIC_KEYS} == recorded


def test_model_object_equals_spec(exported, split_dir):
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)

    from_object = evaluate_split(model, split_dir)
    from_spec = evaluate_split(f'local-dir:{exported}', split_dir)
    assert {k: from_object[k] for k in METRIC_KEYS} == {k: from_spec[k] for k in METRIC_KEYS}
    assert from_object['model'] == 'transfer_tiny'
    assert not model.training


def test_batch_size_covers_every_image(exported, split_dir):
    full = evaluate_split(f'local-dir:{exported}', split_dir)
    batched = evaluate_split(f'local-dir:{exported}', split_dir, batch_size=8)

    assert batched['n'] == full['n']
    assert batched['confusion_matrix'] == full['confusion_matrix']
    with pytest.raises(ValueError, match='batch_size must be a positive integer, got 0'):
        evaluate_split(f'local-dir:{exported}', split_dir, batch_size=0)


def test_other_num_classes_raises(split_dir):
    model = timm.create_model('transfer_tiny', num_classes=7)

    with pytest.raises(ValueError, match='num_classes=7') as excinfo:
        evaluate_split(model, split_dir)
    assert 'num_classes=8' in str(excinfo.value)


def test_permuted_label_names_are_matched(exported, split_dir):
    reference = timm.create_model(f'local-dir:{exported}', pretrained=True)
    permuted = timm.create_model(f'local-dir:{exported}', pretrained=True)
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    with torch.no_grad():
        permuted.head.weight.copy_(reference.head.weight[order])
        permuted.head.bias.copy_(reference.head.bias[order])
    permuted.pretrained_cfg = dict(permuted.pretrained_cfg, label_names=[FERPLUS_CLASSES[i] for i in order])

    expected = evaluate_split(reference, split_dir)
    result = evaluate_split(permuted, split_dir)
    assert result['accuracy'] == expected['accuracy']
    assert result['per_class_recall'] == expected['per_class_recall']
    assert result['label_names'] == [FERPLUS_CLASSES[i] for i in order]
    matrix = np.array(expected['confusion_matrix'])
    assert result['confusion_matrix'] == matrix[np.ix_(order, order)].tolist()


def test_foreign_label_names_raise(split_dir):
    model = _random_tiny_model(1)
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=[f'class{i}' for i in range(8)])

    with pytest.raises(ValueError, match='are not the FER\\+ classes'):
        evaluate_split(model, split_dir)


def test_missing_label_names_assume_ferplus_order(exported, split_dir, caplog):
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    expected = evaluate_split(model, split_dir)
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'label_names'}

    with caplog.at_level(logging.WARNING):
        result = evaluate_split(model, split_dir)
    assert 'no label_names' in caplog.text
    assert result['confusion_matrix'] == expected['confusion_matrix']


def test_split_without_labelled_images_raises(tmp_path, split_dir):
    split = tmp_path / 'FER2013Valid'
    split.mkdir()
    name = 'fer0028639.png'
    shutil.copyfile(split_dir / name, split / name)
    # Votes split 3/3/2/2, so no emotion has a majority.
    (split / 'label.csv').write_text(f'{name},"(0, 0, 48, 48)",3,3,2,2,0,0,0,0,0,0\n')

    with pytest.raises(DataError, match="no image has a valid 'majority' label"):
        evaluate_split(_random_tiny_model(2), split)


def test_missing_split_folder_raises(tmp_path):
    with pytest.raises(DataError, match='split folder not found'):
        evaluate_split(_random_tiny_model(2), tmp_path / 'absent')


def test_missing_model_folder_raises(tmp_path, split_dir):
    absent = tmp_path / 'no_such_export'
    with pytest.raises(FileNotFoundError) as info:
        evaluate_split(f'local-dir:{absent}', split_dir)
    assert f'Model folder {absent} not found' in str(info.value)


def test_folder_without_config_raises(tmp_path, split_dir):
    with pytest.raises(FileNotFoundError) as info:
        evaluate_split(f'local-dir:{tmp_path}', split_dir)
    assert f'{tmp_path} contains no config.json' in str(info.value)


def test_cli_reports_missing_model_folder(tmp_path, split_dir, capsys):
    from transfer_timm.cli import main
    absent = tmp_path / 'no_such_export'
    status = main(['evaluate', f'local-dir:{absent}', str(split_dir)])
    captured = capsys.readouterr()
    assert status != 0
    assert f'Model folder {absent} not found' in captured.err
    assert captured.out == ''


def test_reproduces_training_example_metrics(tmp_path):
    """A one-epoch run of examples/finetune_ferplus.py writes metrics.json. Evaluating its
    export on the same validation folder gives the same numbers exactly."""
    out = tmp_path / 'run'
    command = [
        sys.executable, str(REPO_ROOT / 'examples' / 'finetune_ferplus.py'),
        '--epochs', '1', '--max_train_samples', '32', '--batch_size', '16', '--output_dir', str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    recorded = json.loads((out / 'export' / 'metrics.json').read_text())
    result = evaluate_split(f'local-dir:{out / "export"}', SAMPLE_VALID)
    assert {k: result[k] for k in METRIC_KEYS} == recorded
