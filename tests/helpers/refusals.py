"""A bad input's refusal as a user sees it: exit code 2, one error naming the field or the file, no
traceback, nothing written. With ``pytest --perf`` it is timed too: in-process, a refusal must come
sooner than a fresh process takes just to import what a run trains with (a ratio to that, not an
absolute limit, and no part of the default run: a loaded machine can miss it)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sylva_ray.cli import main
from tests.helpers.cli_capture import run_captured

#: A refusal in-process may take at most this many times a fresh process importing what a run trains with.
IMPORT_TIME_RATIO = 1.0
#: What a client's training imports (each process imports its libraries at first use, so a fresh
#: ``sylva-ray config`` no longer loads them): the reference a refusal must not exceed.
RUN_IMPORTS = (
    "import peft, torchattacks; import sylva_ray.cli, sylva_ray.engine.client, sylva_ray.engine.resolve; "
    "from sylva_ray.method.models import timm_library; timm_library()"
)


def import_seconds() -> float:
    """Wall time of a fresh process that imports what a run trains with, which a refusal must not exceed."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", RUN_IMPORTS], check=True, capture_output=True)
    return time.monotonic() - started


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(argv: list[str], named: str, where: Path, budget: float | None, entry=main) -> str:
    """Run ``entry(argv)`` in this process; assert a clean refusal; return what was logged.

    ``budget`` is the ``refusal_budget`` fixture: ``None`` (no timing) unless the session runs with
    ``--perf``, where it is :func:`import_seconds` and the refusal's wall time is checked against it."""
    before = snapshot(where)
    code, text, seconds = run_captured(entry, argv)
    assert code == 2, (code, text)
    assert named in text, text
    assert "Traceback" not in text
    assert snapshot(where) == before  # nothing written or overwritten
    if budget is not None:
        assert seconds / budget <= IMPORT_TIME_RATIO, (seconds, budget)
    return text
