"""Figures: matplotlib without a display (actors and cluster nodes have none), one resolution, and
one way to write a PNG (atomically, like every other result file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sylva_ray.base.storage import atomic_write_with

#: Resolution of every PNG the package writes: sharp on a laptop screen, small in a run directory.
DPI = 120


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; imported on first use (it costs ~0.3 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temp file, then rename) and close it."""
    atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    pyplot().close(fig)
    return Path(path)
