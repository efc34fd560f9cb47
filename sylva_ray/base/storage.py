"""Atomic file writes: a crash mid-write never leaves a half-written result or checkpoint.

Every file is written to a temporary sibling, flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

#: Name pattern of the temporary siblings (``.NAME.XXXXXXXX.tmp``): a killed write leaves one behind.
TEMP_GLOB = ".*.tmp"


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # the usual default where /proc is not there


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; results follow the user's umask
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)  # the rename itself survives a power cut
    return target


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync directories
        pass
    finally:
        os.close(fd)


def remove_orphaned_temp_files(folder: Path) -> list[Path]:
    """Delete what killed writes left under ``folder`` (only when nothing is writing there)."""
    orphans = [p for p in Path(folder).rglob(TEMP_GLOB) if p.is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_with(path: str | Path, writer: Callable[[str], None]) -> Path:
    """For libraries that insist on writing a path themselves (pandas, safetensors, matplotlib)."""
    return _atomic_write(path, writer)


def default_cache_dir() -> Path:
    """Where derived artefacts are cached (pre-trained weights, decoded images): ``$SYLVA_RAY_CACHE``,
    else ``~/.cache/sylva_ray``."""
    return Path(os.environ.get("SYLVA_RAY_CACHE", Path.home() / ".cache" / "sylva_ray"))
