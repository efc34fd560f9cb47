"""Sphinx extension (and script): the data-flow diagram, drawn with matplotlib at every build.

``python docs/_ext/sylva_diagrams.py OUT.png`` draws it alone. Drawn from the list below, which
names the real calls (``ray.put``, ``ray.wait``, the actor methods), so a reader can follow each
arrow into the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: Where the built page expects the picture, relative to the docs' source folder.
DIAGRAM = Path("_static") / "dataflow.png"

#: (x, title, lines) of the three columns: the processes of a run.
COLUMNS = [
    (
        0.17,
        "main process (sylva-ray)",
        [
            "check the config, data, weights",
            "start or join Ray; plan the pool",
            "ray.put(data pools, backbone) once",
            "start client actors, then the driver",
            "show progress; exit code 0 or 2",
        ],
    ),
    (
        0.5,
        "driver actor (this node)",
        [
            "sample the round's clients",
            "ray.put(global adapter) once",
            "jobs largest first; ray.wait",
            "aggregate (ball tree), evaluate",
            "tables + checkpoint every round",
            "Phase 2: games, tailoring, protocol",
        ],
    ),
    (
        0.83,
        "client actors (pool)",
        [
            "build the backbone once",
            "train any client, given its state",
            "PGD (torchattacks) + Sylva loss",
            "LoRA adapter bytes + head + metrics",
            "coalitions, tailoring, AutoAttack",
        ],
    ),
]
#: (from column, to column, y, label) of the arrows between them.
ARROWS = [
    (0, 2, 0.55, "object refs: data, backbone (zero-copy)"),
    (0, 1, 0.45, "actor handles"),
    (1, 2, 0.35, "Job(client, state) + ref to the global adapter"),
    (2, 1, 0.25, "Outcome: adapter bytes, head, metrics"),
    (1, 0, 0.15, "round summary, final summary.json"),
]


def draw(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(12, 5.2), dpi=110)
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    width = 0.28
    for x, title, lines in COLUMNS:
        ax.add_patch(
            FancyBboxPatch(
                (x - width / 2, 0.62), width, 0.36, boxstyle="round,pad=0.01", facecolor="#eef3fb", edgecolor="#3b5b92"
            )
        )
        ax.text(x, 0.955, title, ha="center", va="top", fontsize=11, weight="bold", color="#1d2f52")
        ax.text(x, 0.9, "\n".join(lines), ha="center", va="top", fontsize=8.5, linespacing=1.45)
        ax.plot([x, x], [0.05, 0.62], color="#9aa9c4", linestyle="--", linewidth=1)
    for start, end, y, label in ARROWS:
        x0, x1 = COLUMNS[start][0], COLUMNS[end][0]
        ax.add_patch(
            FancyArrowPatch((x0, y), (x1, y), arrowstyle="-|>", mutation_scale=14, color="#c0392b", linewidth=1.4)
        )
        ax.text((x0 + x1) / 2, y + 0.015, label, ha="center", va="bottom", fontsize=8.5, color="#7b241c")
    ax.text(
        0.5,
        0.01,
        "one round of Phase 1; Phase 2 sends coalition, tailoring and protocol jobs the same way",
        ha="center",
        va="bottom",
        fontsize=8,
        style="italic",
        color="#555555",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def build(app: Any) -> None:
    draw(Path(app.srcdir) / DIAGRAM)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", build)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / DIAGRAM)
