"""Publish release folders to the Hugging Face Hub and mirror them into an offline Hub cache.

A release folder is an export folder (see :func:`transfer_timm.training.export_model`)
reduced to the files that a Hub model repo contains: ``model.safetensors``, ``config.json``
and ``README.md``, plus optionally ``confusion_matrix.png`` and ``metrics.json``.
"""
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Union

import timm
import yaml
from huggingface_hub import HfApi
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

_logger = logging.getLogger(__name__)

__all__ = [
    'MAX_MODEL_BYTES', 'OPTIONAL_FILES', 'REQUIRED_FILES', 'ReleaseError',
    'build_hub_cache', 'check_repo_id', 'publish_release', 'validate_release',
]

REQUIRED_FILES = ('model.safetensors', 'config.json', 'README.md')
OPTIONAL_FILES = ('confusion_matrix.png', 'metrics.json')
# Upper limit for the weights of a release: 30 MB (30 * 10**6 bytes). transfer_tiny
# weights take 8.3 MB, so the limit catches a checkpoint with optimizer state or the
# wrong architecture before it reaches the Hub.
MAX_MODEL_BYTES = 30 * 10**6

# Estimated file size from which the Hub stores any file with LFS (see _is_lfs).
_LFS_MIN_BYTES = 10 * 1024 * 1024
# Suffixes of binary files that the Hub stores with LFS, an estimate like the size above.
_LFS_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.onnx', '.png', '.jpg', '.jpeg')
_COMMIT_HASH = re.compile(r'^[0-9a-f]{40}$')


class ReleaseError(ValueError):
    """Invalid release folder; the message lists every problem found, naming the files."""


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a valid Hub repo id of the form ``ORG/NAME``."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'Invalid Hub repo id {repo_id!r}: {e}') from None
    if '/' not in repo_id:
        raise ValueError(f'Invalid Hub repo id {repo_id!r}: use the form ORG/NAME.')


def _check_config(path: Path) -> List[str]:
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f'{path.name}: not valid JSON ({e}).']
    if not isinstance(config, dict):
        return [f'{path.name}: must hold a JSON object, found {type(config).__name__}.']
    problems = []
    if not isinstance(config.get('architecture'), str) or not config['architecture']:
        problems.append(f'{path.name}: missing "architecture", the timm model name that builds the weights.')
    pretrained_cfg = config.get('pretrained_cfg')
    label_names = pretrained_cfg.get('label_names') if isinstance(pretrained_cfg, dict) else None
    if not label_names:
        problems.append(
            f'{path.name}: missing "pretrained_cfg.label_names", the class names in output order. '
            f'Export the model with transfer_timm.training.export_model, which writes them.'
        )
    elif isinstance(config.get('num_classes'), int) and len(label_names) != config['num_classes']:
        problems.append(
            f'{path.name}: pretrained_cfg.label_names has {len(label_names)} names but num_classes '
            f'is {config["num_classes"]}.'
        )
    return problems


def _check_model_card(path: Path) -> List[str]:
    try:
        metadata = metadata_load(path)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        return [f'{path.name}: invalid YAML front matter ({e}).']
    if metadata is None:
        return [f'{path.name}: no YAML front matter. The file must start with a "---" block that '
                f'contains "library_name: timm".']
    if metadata.get('library_name') != 'timm':
        return [f'{path.name}: front matter has library_name {metadata.get("library_name")!r}, expected "timm".']
    return []


def _check_loads(folder: Path) -> List[str]:
    # Importing this module has imported transfer_timm, which registers the architectures with timm.
    try:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:  # noqa: BLE001  (any failure means the release is unusable; the cause is kept)
        return [f'timm.create_model("local-dir:{folder}", pretrained=True) failed: {type(e).__name__}: {e}']
    return []


def validate_release(
        folder: Union[str, os.PathLike],
        max_model_bytes: int = MAX_MODEL_BYTES,
        check_load: bool = True,
) -> List[str]:
    """Check a release folder and return the names of its files, sorted.

    The folder must contain exactly :data:`REQUIRED_FILES`, optionally
    :data:`OPTIONAL_FILES`, and nothing else. ``model.safetensors`` may be at most
    ``max_model_bytes`` bytes, ``config.json`` needs ``architecture`` and
    ``pretrained_cfg.label_names``, and ``README.md`` needs front matter with
    ``library_name: timm``. With ``check_load``, timm must also create the model from
    the folder with ``local-dir:``.

    Raises:
        ReleaseError: Listing every problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseError(f'{folder}: release folder not found.')
    present = sorted(p.name for p in folder.iterdir())
    problems = []
    for name in present:
        path = folder / name
        if name not in REQUIRED_FILES + OPTIONAL_FILES:
            problems.append(
                f'{name}: not part of a release. A release contains only {", ".join(REQUIRED_FILES)} and '
                f'optionally {", ".join(OPTIONAL_FILES)}, so remove it.'
            )
        elif not path.is_file():
            problems.append(f'{name}: must be a regular file.')
    for name in REQUIRED_FILES:
        if name not in present:
            problems.append(f'{name}: missing.')

    weights = folder / 'model.safetensors'
    if weights.is_file() and weights.stat().st_size > max_model_bytes:
        problems.append(
            f'model.safetensors: {weights.stat().st_size} bytes, more than the limit of {max_model_bytes} bytes. '
            f'Export the model weights alone (no optimizer state) or raise the limit.'
        )
    if (folder / 'config.json').is_file():
        problems += _check_config(folder / 'config.json')
    if (folder / 'README.md').is_file():
        problems += _check_model_card(folder / 'README.md')
    if not problems and check_load:
        problems += _check_loads(folder)
    if problems:
        raise ReleaseError(f'Invalid release folder {folder}:\n' + '\n'.join(f'- {p}' for p in problems))
    return [name for name in present if name in REQUIRED_FILES + OPTIONAL_FILES]


def publish_release(
        folder: Union[str, os.PathLike],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: str = 'Upload TransFER release',
        api: Optional[HfApi] = None,
        max_model_bytes: int = MAX_MODEL_BYTES,
):
    """Validate a release folder, then upload it as one commit to a Hub model repo.

    Creates the repo if it does not exist (``private`` applies only then). The commit
    uploads the release files and deletes any ``confusion_matrix.png`` or
    ``metrics.json`` left in the repo by an earlier release that this one lacks.

    Args:
        folder: Release folder, checked with :func:`validate_release`.
        repo_id: Hub repo id, ``ORG/NAME``.
        token: Hub access token with write access; None uses the ``HF_TOKEN``
            environment variable or the token saved by ``hf auth login``.
        private: Create a new repo as private.
        commit_message: Message of the upload commit.
        api: An ``HfApi``-like object; None creates ``HfApi(token=token)``.
        max_model_bytes: Size limit for ``model.safetensors``.

    Returns:
        The ``CommitInfo`` that ``HfApi.upload_folder`` returns.
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    files = validate_release(folder, max_model_bytes=max_model_bytes)
    api = api if api is not None else HfApi(token=token)

    _logger.info('Publishing %s (%s) to %s.', folder, ', '.join(files), repo_id)
    repo_url = api.create_repo(repo_id=repo_id, token=token, private=private, repo_type='model', exist_ok=True)
    _logger.info('Repo ready: %s', repo_url)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type='model',
        token=token,
        commit_message=commit_message,
        allow_patterns=files,
        delete_patterns=[name for name in OPTIONAL_FILES if name not in files],
    )
    _logger.info('Uploaded %s to %s: %s', folder, repo_id, getattr(commit, 'commit_url', commit))
    return commit


def _git_blob_sha1(path: Path) -> str:
    """Return the git object id of a file, which the Hub sends as the ETag of a non-LFS file."""
    digest = hashlib.sha1(f'blob {path.stat().st_size}\0'.encode())
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    """Return the SHA-256 of a file, which the Hub sends as the ETag of an LFS file."""
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _is_lfs(path: Path) -> bool:
    # NOTE: an estimate of the Hub's choice, which its preupload call makes per file.
    # Offline loading reads only refs/ and snapshots/, so a different blob name here
    # does not affect hf_hub_download.
    if path.suffix.lower() in _LFS_SUFFIXES or path.stat().st_size >= _LFS_MIN_BYTES:
        return True
    with path.open('rb') as f:
        return b'\0' in f.read(8192)


def _file_etag(path: Path) -> str:
    return _sha256(path) if _is_lfs(path) else _git_blob_sha1(path)


def _link_or_copy(blob: Path, pointer: Path) -> None:
    """Point ``pointer`` at ``blob`` with a relative symlink, as huggingface_hub does,
    or copy the blob where the file system has no symlinks."""
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except (OSError, NotImplementedError):
        shutil.copyfile(blob, pointer)


def build_hub_cache(
        folder: Union[str, os.PathLike],
        repo_id: str,
        cache_dir: Union[str, os.PathLike],
        revision: str = 'main',
        commit_hash: Optional[str] = None,
) -> Path:
    """Lay out a folder's files as a cached Hub model repo, so that loading works offline.

    Writes the layout of huggingface_hub's cache (checked against huggingface_hub 2.4.0):
    ``models--ORG--NAME/blobs/<etag>`` (SHA-256 for LFS files, the git blob SHA-1
    otherwise), ``snapshots/<commit>/<file>`` as relative symlinks (copies where the file
    system has none) and ``refs/<revision>`` with the commit hash. With
    ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=cache_dir`` (or ``cache_dir=`` passed),
    ``hf_hub_download(repo_id, filename)`` and therefore
    ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` read these files.

    Args:
        folder: Folder whose files, including those in subfolders, make up the repo.
        repo_id: Hub model repo id, ``ORG/NAME``.
        cache_dir: Hub cache root, the folder that ``HF_HUB_CACHE`` names.
        revision: Branch or tag name recorded in ``refs/``, or a 40-hex commit hash,
            which needs no ref.
        commit_hash: Commit hash of the snapshot. Default: ``revision`` when it is a
            commit hash, else a SHA-1 of the file names and contents, so an unchanged
            folder maps to the same snapshot and a changed one to a new snapshot.

    Returns:
        The snapshot folder, as ``huggingface_hub.snapshot_download`` returns it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder}: folder to mirror into the Hub cache not found.')
    check_repo_id(repo_id)
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    if not files:
        raise FileNotFoundError(f'{folder}: no files to mirror into the Hub cache.')
    etags: Dict[str, str] = {p.relative_to(folder).as_posix(): _file_etag(p) for p in files}

    if commit_hash is None:
        if _COMMIT_HASH.match(revision):
            commit_hash = revision
        else:
            listing = ''.join(f'{name}\0{etag}\n' for name, etag in sorted(etags.items()))
            commit_hash = hashlib.sha1(listing.encode()).hexdigest()
    if not _COMMIT_HASH.match(commit_hash):
        raise ValueError(f'commit_hash must be 40 lowercase hex digits, got {commit_hash!r}.')
    if _COMMIT_HASH.match(revision) and revision != commit_hash:
        raise ValueError(f'revision {revision} is a commit hash that differs from commit_hash {commit_hash}.')

    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type='model')
    blobs = storage / 'blobs'
    snapshot = storage / 'snapshots' / commit_hash
    blobs.mkdir(parents=True, exist_ok=True)
    for name, etag in etags.items():
        blob = blobs / etag
        if not blob.exists():
            tmp = blobs / f'{etag}.incomplete'
            shutil.copyfile(folder / name, tmp)
            os.replace(tmp, blob)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(blob, pointer)

    if revision != commit_hash:
        # huggingface_hub 2.4.0 reads the ref with f.read() and no strip, so no trailing newline.
        ref = storage / 'refs' / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit_hash, encoding='ascii')
    _logger.info('Mirrored %d files of %s into %s (revision %s, commit %s).',
                 len(etags), folder, storage, revision, commit_hash)
    return snapshot
