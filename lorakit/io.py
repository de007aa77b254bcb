"""Atomic file writes: a file is written under a temporary name beside its target, flushed to
disk, then renamed over the target. A crash or SIGKILL at any point leaves either the old file
or the new one, never a torn one. Every file lorakit writes goes through here.

Permissions are what a plain ``open(path, "w")`` would give: a new file gets 0o666 minus the
process's umask (``-rw-r--r--`` under the usual umask 022), and a file that is replaced keeps its
mode. ``mkstemp`` alone creates 0o600, which would leave an exported GGUF unreadable to the
llama.cpp server, Ollama service or teammate running as another user."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync it, and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after write: a writer that recreates the file would reset it
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask. Reading it means setting it, so the read is locked against other threads."""
    with _UMASK_LOCK:
        current = os.umask(0o022)
        os.umask(current)
    return current


def _mode_for(path: Path) -> int:
    """The permission bits `path` gets: its own if it exists, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def temp_dir_beside(target: Path) -> Path:
    """A new empty directory beside `target`, to be filled and renamed onto it, with the permissions a
    plain ``mkdir(target)`` would have (``mkdtemp`` alone makes it 0o700, private to this user)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o777 & ~_umask()
    os.chmod(tmp, mode)
    return tmp


def plain_modes_(directory: Path) -> None:
    """Give every file and folder under a new `directory` the mode a plain write would have. For trees that
    another library filled (``save_pretrained`` in transformers 5.24 writes model.safetensors as 0o600)."""
    umask = _umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, nesting deeper than the stack
        raise ValueError(f"{what} {path} is not valid JSON ({e}); the file is corrupted or not a {what}") from None


def read_safetensors(path: str | os.PathLike, what: str, fix: str = "save or download it again") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle); a truncated or corrupt file is a clear error ending in `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(what, path, e, fix) from None


def check_safetensors(path: str | os.PathLike, what: str) -> None:
    """Read a safetensors file's header and check it against the file's size (cheap: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(what, path, e, "save or download it again") from None


def _unreadable(what: str, path: Path, error: Exception, fix: str) -> ValueError:
    return ValueError(f"{what} {path} cannot be read as safetensors ({error}); it is truncated or corrupted"
                      + (f": {fix}" if fix else ""))
