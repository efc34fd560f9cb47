"""Calling an entry point (``sylva-ray``'s ``main``, the sweep script's) in this process, as a user would."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Callable, Sequence


def run_captured(entry: Callable[[Sequence[str]], int], argv: Sequence[str]) -> tuple[int, str, float]:
    """``entry(argv)``: its exit code, what it logged at ERROR (stdout is swallowed), and seconds."""
    errors = io.StringIO()
    handler = logging.StreamHandler(errors)
    handler.setLevel(logging.ERROR)
    logging.getLogger().addHandler(handler)
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = entry(list(argv))
    finally:
        logging.getLogger().removeHandler(handler)
    return code, errors.getvalue(), time.monotonic() - started
