"""The released transfer_tiny.ferplus folder: contents, card and reproducible metrics."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm
import transfer_timm  # noqa: F401
from transfer_timm.hub import validate_release
from transfer_timm.training.evaluate import evaluate_split

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / 'releases' / 'transfer_tiny.ferplus'
FERPLUS_VALID = ROOT.parent / 'shared' / 'ferplus' / 'FER2013Valid'


def test_release_folder_contents():
    names = sorted(p.name for p in RELEASE.iterdir())
    assert names == ['README.md', 'config.json', 'confusion_matrix.png', 'metrics.json', 'model.safetensors']
    assert (RELEASE / 'model.safetensors').stat().st_size <= 30 * 10**6
    assert validate_release(RELEASE) is not None


def test_release_config_matches_tag():
    config = json.loads((RELEASE / 'config.json').read_text())
    cfg = timm.models.get_pretrained_cfg('transfer_tiny.ferplus')
    assert config['architecture'] == 'transfer_tiny'
    assert config['pretrained_cfg']['label_names'] == list(cfg.label_names)
    assert tuple(config['pretrained_cfg']['input_size']) == cfg.input_size
    assert tuple(config['pretrained_cfg']['mean']) == cfg.mean


def test_release_weights_load_strictly():
    model = timm.create_model(f'local-dir:{RELEASE}', pretrained=True)
    saved = load_file(RELEASE / 'model.safetensors')
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(value, saved[key]), key


def test_card_reports_metrics_and_ablation():
    card = (RELEASE / 'README.md').read_text()
    metrics = json.loads((RELEASE / 'metrics.json').read_text())
    assert card.startswith('---\nlibrary_name: timm\n')
    assert f"| accuracy | {100 * metrics['accuracy']:.2f}% |" in card
    assert f"| mean class accuracy | {100 * metrics['mean_class_accuracy']:.2f}% |" in card
    for section in ('## Ablation: MAD and MSAD', '## Licence', '## Intended use and limits', '## Training run'):
        assert section in card, section
    assert 'confusion_matrix.png' in card


@pytest.mark.skipif(not FERPLUS_VALID.is_dir(), reason=f'FER+ validation split not found at {FERPLUS_VALID}')
def test_evaluate_reproduces_card_accuracy():
    metrics = json.loads((RELEASE / 'metrics.json').read_text())
    result = evaluate_split(f'local-dir:{RELEASE}', FERPLUS_VALID, label_mode='majority')
    assert result['n'] == metrics['n'] == 3191
    assert result['confusion_matrix'] == metrics['confusion_matrix']
    assert result['accuracy'] == metrics['accuracy']
    assert result['mean_class_accuracy'] == metrics['mean_class_accuracy']
