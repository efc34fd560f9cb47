"""Progress bars the engine draws, and the silent one for runs that show none.

A factory, not a bar, is passed around: ``factory(total=..., desc=...)`` gives an object with
``update(n)``, ``set_description`` and ``close()``: tqdm's in this process; the Ray driver actor
passes Ray's ``tqdm_ray``, which draws in the main process.
"""

from __future__ import annotations

from typing import Any, Callable

#: A progress bar factory (tqdm's signature).
ProgressFactory = Callable[..., Any]


class SilentBar:
    """The progress bar of a run asked to show none (``progress=False``: compare, sweeps, tests)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass
