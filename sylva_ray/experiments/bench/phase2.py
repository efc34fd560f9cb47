"""``sylva-ray bench phase2``: on one Phase-1 run, Phase 1 only, head only, Shapley top-k, random k,
last k and all layers, each scored by the final protocol; v = clean + robust and the game's cost.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.distributed.launcher import run, run_phase2
from sylva_ray.engine.rundir import write_table
from sylva_ray.experiments.bench.common import with_sections

#: ``bench phase2``'s variants: (label, overrides on the finished Phase-1 run). Phase 1 only is
#: the fused model untouched, scored by the same protocol as the others.
PHASE2_VARIANTS = [
    ("phase 1 only", ["layer_selection.selection=none"]),
    ("head only", ["layer_selection.selection=head"]),
    ("shapley top-k", ["layer_selection.selection=top_k"]),
    ("shapley top-k, accuracy value", ["layer_selection.selection=top_k", "layer_selection.value=linear"]),
    ("random k", ["layer_selection.selection=random"]),
    ("last k", ["layer_selection.selection=last"]),
    ("all layers", ["layer_selection.selection=all"]),
]
#: Per-client figures ``bench phase2`` reports (client means), when the protocol produced them.
PHASE2_FIGURES = ("clean_acc", "robust_acc", "autoattack_acc", "strongest_attack_acc")


def bench_phase2(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Does the layer game pay? On one Phase-1 run of ``cfg``: Phase 1 only, head only, Shapley
    top-k, random k, last k and all layers, each tailored from the same fused model and scored by
    the same final protocol on each client's test split; v = clean + robust (PGD), the game's cost
    in seconds and coalition evaluations, and ``bench_phase2_clients.csv`` client by client."""
    phase1_dir = out / "phase1"
    phase1_dir.mkdir(parents=True, exist_ok=True)
    # Phase 1 without its own protocol: the "phase 1 only" variant scores the same model with it.
    run(
        with_sections(
            cfg,
            layer_selection={"enabled": False},
            evaluation={"autoattack": False, "sanity_checks": False, "transfer": []},
        ),
        phase1_dir,
    )
    protocol = [
        f"evaluation.autoattack={str(cfg.evaluation.autoattack).lower()}",
        f"evaluation.sanity_checks={str(cfg.evaluation.sanity_checks).lower()}",
        "evaluation.transfer=[" + ",".join(cfg.evaluation.transfer) + "]",
    ]
    rows, clients = [], []
    for label, overrides in PHASE2_VARIANTS:
        result_dir, summary = run_phase2(phase1_dir, overrides + protocol)
        stages = summary["seconds_by_stage"]
        means = summary["phase2"]
        rows.append(
            {
                "variant": label,
                **{k: means[k] for k in PHASE2_FIGURES if k in means},
                "v": means["clean_acc"] + means["robust_acc"],
                "evaluations": summary["evaluations"],
                "game_seconds": stages["phase2_game"],
                "tailoring_seconds": stages["tailoring"],
                "protocol_seconds": stages["protocol"],
                "result": result_dir.name,
            }
        )
        for row in summary["per_client"]:
            clients.append({"variant": label, "client": row["client"], **{k: row.get(k) for k in PHASE2_FIGURES}})
    frame = pd.DataFrame(rows)
    reference = float(frame.loc[frame["variant"] == "phase 1 only", "v"].iloc[0])
    frame["v_minus_phase1"] = frame["v"] - reference
    write_table(out / "bench_phase2_clients.csv", pd.DataFrame(clients))
    return frame.round(4)
