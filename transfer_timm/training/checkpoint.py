"""Atomic writes: a killed run leaves the previous file or folder intact, never a partial one."""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Union

import torch
from safetensors.torch import save_file

__all__ = ['atomic_write_json', 'atomic_save_safetensors', 'atomic_replace_dir', 'fsync_dir']


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates the file as 0600; give it the permissions of an ordinary new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_json(path: Union[str, os.PathLike], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    _atomic_write(Path(path), lambda p: p.write_text(json.dumps(data, indent=2) + '\n', encoding='utf-8'))


def atomic_save_safetensors(
        path: Union[str, os.PathLike],
        state_dict: Dict[str, torch.Tensor],
        metadata: Dict[str, str] = None,
) -> None:
    """Save tensors as safetensors through a temporary file and a rename."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata or {'format': 'pt'}))


def atomic_replace_dir(tmp_dir: Union[str, os.PathLike], final_dir: Union[str, os.PathLike]) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing any older version.

    The old folder is first renamed aside and deleted only after the new one is in place,
    so at every moment either the old or the new complete folder exists under a known name.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + '.old')
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)
