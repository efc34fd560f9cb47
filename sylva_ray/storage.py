"""Atomic file writes: a crash mid-write never leaves a half-written result or checkpoint.

Every file is written to a temporary sibling, flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_with(path: str | Path, writer: Callable[[str], None]) -> Path:
    """For libraries that insist on writing a path themselves (pandas, safetensors, matplotlib)."""
    return _atomic_write(path, writer)
