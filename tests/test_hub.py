"""Tests for publishing release folders and for loading them offline from a Hub cache.

No test reaches the Hub: uploads go to a recording stand-in for ``HfApi``, and loading
runs with huggingface_hub's offline mode on, a cache built in a temporary folder and
outgoing socket connections refused.
"""
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file

import timm
import transfer_timm
from transfer_timm.hub import (
    OPTIONAL_FILES, ReleaseError, build_hub_cache, publish_release, validate_release,
)
from transfer_timm.training import export_model, metrics_from_confusion

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = 'test-org/transfer_tiny.random'
FERPLUS_RELEASE = REPO_ROOT / 'releases' / 'transfer_tiny.ferplus'


def _random_tiny_model(seed: int) -> torch.nn.Module:
    """Return transfer_tiny with random weights, including a non-zero classifier."""
    torch.manual_seed(seed)
    model = timm.create_model('transfer_tiny')
    # The classifier starts at zero, so random values make head re-initialisation visible.
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model


@pytest.fixture(scope='module')
def release(tmp_path_factory) -> Path:
    """Export folder of a random transfer_tiny, without metrics."""
    out = tmp_path_factory.mktemp('release') / 'transfer_tiny.random'
    return export_model(_random_tiny_model(0), out, transfer_timm.FERPLUS_LABEL_NAMES)


@pytest.fixture(scope='module')
def release_with_metrics(tmp_path_factory) -> Path:
    """Export folder with metrics.json and confusion_matrix.png."""
    matrix = torch.eye(8, dtype=torch.long) * 3
    matrix[0, 1] = 2
    metrics = metrics_from_confusion(matrix, transfer_timm.FERPLUS_LABEL_NAMES)
    out = tmp_path_factory.mktemp('release') / 'with_metrics'
    return export_model(_random_tiny_model(1), out, transfer_timm.FERPLUS_LABEL_NAMES, metrics=metrics)


def _copy_release(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


class RecordingHfApi:
    """Stand-in for ``huggingface_hub.HfApi`` that records calls instead of sending them."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(('create_repo', kwargs))
        return f'https://hub.invalid/{kwargs["repo_id"]}'

    def upload_folder(self, **kwargs):
        self.calls.append(('upload_folder', kwargs))
        return 'https://hub.invalid/commit/0'


# Publishing.

def test_publish_creates_repo_then_uploads(release):
    api = RecordingHfApi()
    result = publish_release(release, REPO_ID, token='hf_test_token', api=api)

    assert result == 'https://hub.invalid/commit/0'
    assert [name for name, _ in api.calls] == ['create_repo', 'upload_folder']
    create = api.calls[0][1]
    assert create['repo_id'] == REPO_ID
    assert create['token'] == 'hf_test_token'
    assert create['repo_type'] == 'model'
    assert create['exist_ok'] is True
    assert create['private'] is False
    upload = api.calls[1][1]
    assert upload['repo_id'] == REPO_ID
    assert upload['token'] == 'hf_test_token'
    assert upload['repo_type'] == 'model'
    assert Path(upload['folder_path']) == release
    assert sorted(upload['allow_patterns']) == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(upload['delete_patterns']) == sorted(OPTIONAL_FILES)


def test_publish_includes_optional_files(release_with_metrics):
    api = RecordingHfApi()
    publish_release(release_with_metrics, REPO_ID, private=True, commit_message='Release v1', api=api)

    create, upload = api.calls[0][1], api.calls[1][1]
    assert create['private'] is True
    assert create['token'] is None
    assert upload['commit_message'] == 'Release v1'
    assert sorted(upload['allow_patterns']) == [
        'README.md', 'config.json', 'confusion_matrix.png', 'metrics.json', 'model.safetensors',
    ]
    assert upload['delete_patterns'] == []


def test_publish_rejects_invalid_repo_id(release):
    api = RecordingHfApi()
    for repo_id in ('no-namespace', 'bad//id', 'org/with space'):
        with pytest.raises(ValueError, match='Invalid Hub repo id'):
            publish_release(release, repo_id, api=api)
    assert api.calls == []


def test_publish_missing_file_uploads_nothing(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / 'README.md').unlink()
    api = RecordingHfApi()

    with pytest.raises(ReleaseError, match=r'README\.md: missing'):
        publish_release(folder, REPO_ID, api=api)
    assert api.calls == []


@pytest.mark.parametrize('name', ['model.safetensors', 'config.json'])
def test_validate_names_missing_file(release, tmp_path, name):
    folder = _copy_release(release, tmp_path)
    (folder / name).unlink()

    with pytest.raises(ReleaseError, match=rf'{name}: missing'):
        validate_release(folder)


def test_validate_rejects_oversized_weights(release):
    size = (release / 'model.safetensors').stat().st_size
    api = RecordingHfApi()

    with pytest.raises(ReleaseError, match=rf'model\.safetensors: {size} bytes, more than the limit of 1000 bytes'):
        publish_release(release, REPO_ID, api=api, max_model_bytes=1000)
    assert api.calls == []
    assert validate_release(release, max_model_bytes=size, check_load=False)


def test_validate_requires_label_names(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    del config['pretrained_cfg']['label_names']
    (folder / 'config.json').write_text(json.dumps(config))

    with pytest.raises(ReleaseError, match=r'config\.json: missing "pretrained_cfg\.label_names"'):
        validate_release(folder)


def test_validate_requires_architecture(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    del config['architecture']
    (folder / 'config.json').write_text(json.dumps(config))

    with pytest.raises(ReleaseError, match=r'config\.json: missing "architecture"'):
        validate_release(folder)


def test_validate_rejects_invalid_json(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / 'config.json').write_text('{"architecture": ')

    with pytest.raises(ReleaseError, match=r'config\.json: not valid JSON'):
        validate_release(folder)


@pytest.mark.parametrize('card, expected', [
    ('# No front matter\n', 'README.md: no YAML front matter'),
    ('---\nlicense: mit\n---\n# Card\n', 'README.md: front matter has library_name None'),
    ('---\nlibrary_name: transformers\n---\n', "README.md: front matter has library_name 'transformers'"),
])
def test_validate_requires_timm_library_name(release, tmp_path, card, expected):
    folder = _copy_release(release, tmp_path)
    (folder / 'README.md').write_text(card)

    with pytest.raises(ReleaseError, match=re.escape(expected)):
        validate_release(folder)


def test_validate_rejects_extra_file(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / 'optimizer.pt').write_bytes(b'state')

    with pytest.raises(ReleaseError, match=r'optimizer\.pt: not part of a release'):
        validate_release(folder)


def test_validate_lists_every_problem(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / 'README.md').unlink()
    (folder / 'notes.txt').write_text('draft')

    with pytest.raises(ReleaseError) as excinfo:
        validate_release(folder, max_model_bytes=1000)
    message = str(excinfo.value)
    assert 'README.md: missing' in message
    assert 'notes.txt: not part of a release' in message
    assert 'model.safetensors: ' in message


def test_validate_rejects_unloadable_weights(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / 'model.safetensors').write_bytes(b'not a safetensors file')

    with pytest.raises(ReleaseError, match=r'timm\.create_model\("local-dir:.*"\, pretrained=True\) failed'):
        validate_release(folder)


def test_validate_accepts_export_with_metrics(release_with_metrics):
    assert validate_release(release_with_metrics) == [
        'README.md', 'config.json', 'confusion_matrix.png', 'metrics.json', 'model.safetensors',
    ]


def test_validate_missing_folder(tmp_path):
    with pytest.raises(ReleaseError, match='release folder not found'):
        validate_release(tmp_path / 'absent')


# The publish script.

def _load_script():
    spec = importlib.util.spec_from_file_location('publish_release_script', REPO_ROOT / 'scripts' / 'publish_release.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_dry_run_uploads_nothing(release, monkeypatch):
    script = _load_script()

    def fail_publish(*args, **kwargs):
        raise AssertionError('--dry-run must not publish')
    monkeypatch.setattr(script, 'publish_release', fail_publish)

    assert script.main(['--dry-run', str(release), REPO_ID]) == 0


def test_script_dry_run_reports_invalid_folder(release, tmp_path, caplog):
    script = _load_script()
    folder = _copy_release(release, tmp_path)
    (folder / 'config.json').unlink()

    with caplog.at_level(logging.ERROR):
        assert script.main(['--dry-run', str(folder), REPO_ID]) == 1
    assert 'config.json: missing' in caplog.text


@pytest.mark.parametrize('argv_token, env_token, expected', [
    ('hf_from_option', 'hf_from_env', 'hf_from_option'),
    (None, 'hf_from_env', 'hf_from_env'),
    (None, None, None),
])
def test_script_token_sources(release, monkeypatch, argv_token, env_token, expected):
    script = _load_script()
    received = {}

    def record_publish(folder, repo_id, **kwargs):
        received.update(kwargs, folder=folder, repo_id=repo_id)
        return 'https://hub.invalid/commit/0'
    monkeypatch.setattr(script, 'publish_release', record_publish)
    if env_token is None:
        monkeypatch.delenv('HF_TOKEN', raising=False)
    else:
        monkeypatch.setenv('HF_TOKEN', env_token)
    argv = [str(release), REPO_ID, '--max-model-mb', '12.5'] + (['--token', argv_token] if argv_token else [])

    assert script.main(argv) == 0
    assert received['token'] == expected
    assert received['repo_id'] == REPO_ID
    assert received['folder'] == str(release)
    assert received['max_model_bytes'] == 12_500_000


# Offline Hub cache.

def _refuse_connection(self, address):
    raise AssertionError(f'a test tried to open a network connection to {address}')


@pytest.fixture
def offline_cache(monkeypatch, tmp_path) -> Path:
    """Hub cache folder with huggingface_hub switched to offline mode and sockets blocked.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into ``constants`` at import,
    so the constants are patched as well as the environment.
    """
    cache = tmp_path / 'hub-cache'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(socket.socket, 'connect', _refuse_connection)
    return cache


def _assert_same_weights(model: torch.nn.Module, weights: dict):
    state = model.state_dict()
    assert sorted(state) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def _git_blob_id(path: Path) -> str:
    return subprocess.run(['git', 'hash-object', str(path)], check=True, capture_output=True, text=True).stdout.strip()


def test_hub_cache_layout(release, offline_cache):
    snapshot = build_hub_cache(release, REPO_ID, offline_cache)

    storage = offline_cache / 'models--test-org--transfer_tiny.random'
    commit = (storage / 'refs' / 'main').read_text()
    assert len(commit) == 40
    assert snapshot == storage / 'snapshots' / commit
    assert sorted(p.name for p in snapshot.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    weights_sha256 = hashlib.sha256((release / 'model.safetensors').read_bytes()).hexdigest()
    assert (snapshot / 'model.safetensors').resolve() == (storage / 'blobs' / weights_sha256).resolve()
    for name in ('README.md', 'config.json'):
        assert (snapshot / name).is_symlink()
        if shutil.which('git'):
            assert (snapshot / name).resolve() == (storage / 'blobs' / _git_blob_id(release / name)).resolve()
        assert (snapshot / name).read_bytes() == (release / name).read_bytes()


def test_hf_hub_download_reads_cache_offline(release, offline_cache):
    build_hub_cache(release, REPO_ID, offline_cache)

    for name in ('config.json', 'model.safetensors', 'README.md'):
        path = hf_hub_download(REPO_ID, name)
        assert Path(path).read_bytes() == (release / name).read_bytes()
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download('test-org/not-cached', 'config.json')


def test_hf_hub_spec_loads_offline(release, offline_cache):
    build_hub_cache(release, REPO_ID, offline_cache)

    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    _assert_same_weights(model, load_file(release / 'model.safetensors'))
    assert list(model.pretrained_cfg['label_names']) == list(transfer_timm.FERPLUS_LABEL_NAMES)


def test_registered_name_with_hub_id_loads_offline(release, offline_cache):
    build_hub_cache(release, REPO_ID, offline_cache)

    model = timm.create_model('transfer_tiny', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=REPO_ID))
    _assert_same_weights(model, load_file(release / 'model.safetensors'))


def test_rebuilt_cache_serves_new_weights(release, tmp_path, offline_cache):
    folder = tmp_path / 'updated'
    export_model(_random_tiny_model(7), folder, transfer_timm.FERPLUS_LABEL_NAMES)

    old_snapshot = build_hub_cache(release, REPO_ID, offline_cache)
    new_snapshot = build_hub_cache(folder, REPO_ID, offline_cache)
    assert new_snapshot != old_snapshot
    assert old_snapshot.is_dir()
    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    _assert_same_weights(model, load_file(folder / 'model.safetensors'))


def test_hub_cache_commit_revision(release, offline_cache):
    commit = 'a' * 40
    snapshot = build_hub_cache(release, REPO_ID, offline_cache, revision=commit)

    assert snapshot.name == commit
    assert not (snapshot.parents[1] / 'refs').exists()
    path = hf_hub_download(REPO_ID, 'config.json', revision=commit)
    assert Path(path).read_bytes() == (release / 'config.json').read_bytes()
    with pytest.raises(ValueError, match='commit_hash must be 40 lowercase hex digits'):
        build_hub_cache(release, REPO_ID, offline_cache, commit_hash='main')


def test_other_num_classes_reinitialises_head(release, offline_cache, caplog):
    build_hub_cache(release, REPO_ID, offline_cache)
    weights = load_file(release / 'model.safetensors')

    with caplog.at_level(logging.INFO, logger='timm'):
        model = timm.create_model(
            'transfer_tiny', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(hf_hub_id=REPO_ID),
        )
    assert model.head.weight.shape == (7, 192)
    assert not torch.equal(model.head.weight, weights['head.weight'][:7])
    # TransFER initialises a new classifier to zero.
    assert torch.count_nonzero(model.head.weight) == 0
    assert 'Missing keys (head.weight, head.bias)' in caplog.text
    state = model.state_dict()
    for key, value in weights.items():
        if not key.startswith('head.'):
            assert torch.equal(state[key], value), key


def test_three_channels_adapt_first_conv(release, offline_cache, caplog):
    build_hub_cache(release, REPO_ID, offline_cache)
    gray = load_file(release / 'model.safetensors')['stem.conv.weight']
    assert gray.shape[1] == 1

    with caplog.at_level(logging.INFO, logger='timm'):
        model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True, in_chans=3)
    rgb = model.stem.conv.weight.detach()
    assert rgb.shape == (gray.shape[0], 3, *gray.shape[2:])
    # timm's adapt_input_conv repeats the channel and scales by 1/3, so a grey image
    # fed as RGB gives the same response.
    assert torch.allclose(rgb, gray.repeat(1, 3, 1, 1) / 3)
    assert torch.allclose(rgb.sum(dim=1, keepdim=True), gray, atol=1e-6)
    assert 'Converted input conv stem.conv pretrained weights from 1 to 3 channel(s)' in caplog.text


def test_offline_env_in_fresh_process(release, tmp_path):
    cache = tmp_path / 'hub-cache'
    build_hub_cache(release, REPO_ID, cache)
    script = (
        'import hashlib, timm, transfer_timm\n'
        f'model = timm.create_model("hf-hub:{REPO_ID}", pretrained=True)\n'
        'digest = hashlib.sha256()\n'
        'for key, value in sorted(model.state_dict().items()):\n'
        '    digest.update(key.encode()); digest.update(value.numpy().tobytes())\n'
        'print(digest.hexdigest())\n'
    )
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_ENDPOINT='http://127.0.0.1:9',
               OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    expected = hashlib.sha256()
    for key, value in sorted(load_file(release / 'model.safetensors').items()):
        expected.update(key.encode())
        expected.update(value.numpy().tobytes())
    assert done.stdout.strip().splitlines()[-1] == expected.hexdigest()


@pytest.mark.skipif(
    not (FERPLUS_RELEASE / 'model.safetensors').is_file(),
    reason='releases/transfer_tiny.ferplus/model.safetensors does not exist yet',
)
def test_ferplus_tag_offline(offline_cache):
    repo_id = timm.models.get_pretrained_cfg('transfer_tiny.ferplus').hf_hub_id
    assert repo_id == 'transfer-timm/transfer_tiny.ferplus'
    build_hub_cache(FERPLUS_RELEASE, repo_id, offline_cache)

    model = timm.create_model('transfer_tiny.ferplus', pretrained=True)
    _assert_same_weights(model, load_file(FERPLUS_RELEASE / 'model.safetensors'))
