"""``sylva-ray bench transfer``: what the transfer attacks add to the final protocol, side by side.

One Phase-1 run of the configuration, then its final protocol on the same tailored models with the
transfer attacks off and on, alternately (``--repeats`` pairs, so a machine that slows down during
the bench slows both): the protocol's wall seconds, the ratio, and the figures each variant reports.
Phase 2 tunes all layers here, so no layer game runs and the protocol is the stage that differs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.distributed.launcher import run, run_phase2
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.transfer_report import FIGURES
from sylva_ray.method.transfer import TRANSFER_KINDS


def bench_transfer(cfg: ExperimentConfig, out: Path, repeats: int = 2) -> pd.DataFrame:
    """Protocol seconds with ``evaluation.transfer`` off and on (the configured sources, or all
    three where the configuration has none), ``repeats`` alternating pairs on one Phase-1 run."""
    sources = list(cfg.evaluation.transfer) or list(TRANSFER_KINDS)
    phase1_dir = out / "phase1"
    phase1_dir.mkdir(parents=True, exist_ok=True)
    raw = cfg.to_dict()
    raw["layer_selection"]["enabled"] = False  # Phase 1 without its own protocol: the variants score its models
    raw["evaluation"].update(autoattack=False, sanity_checks=False, transfer=[])
    run(build_config(raw), phase1_dir)
    protocol = [
        f"evaluation.autoattack={str(cfg.evaluation.autoattack).lower()}",
        f"evaluation.sanity_checks={str(cfg.evaluation.sanity_checks).lower()}",
        "layer_selection.selection=all",
    ]
    variants = {"transfer off": "[]", "transfer on": "[" + ",".join(sources) + "]"}
    rows = []
    for repeat in range(repeats):
        for label, value in variants.items():
            result_dir, summary = run_phase2(phase1_dir, [*protocol, f"evaluation.transfer={value}"])
            means = summary["phase2"]
            rows.append(
                {
                    "variant": label,
                    "repeat": repeat,
                    "sources": value,
                    "protocol_seconds": summary["seconds_by_stage"]["protocol"],
                    "robust_acc": means["robust_acc"],
                    "strongest_attack_acc": means.get("strongest_attack_acc"),
                    **{k: means.get(k) for k in ("strongest_whitebox_acc", *FIGURES)},
                    "result": result_dir.name,
                }
            )
    frame = pd.DataFrame(rows)
    off = frame.loc[frame["variant"] == "transfer off", "protocol_seconds"].mean()
    frame["protocol_vs_off"] = frame["protocol_seconds"] / off
    return frame
