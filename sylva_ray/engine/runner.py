"""A run in the order a reader expects: Phase 1 round by round, then Phase 2, then the summary.

The same calls drive a federation in this process (``LocalSession``) and one that lives in a driver
actor (``distributed.actors.DriverHandle``): each is a ``Session``. Resuming checks live here
too, because they decide whether a run directory may continue before anything starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

import pandas as pd
from tqdm.auto import tqdm

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.engine.rundir import write_table

if TYPE_CHECKING:  # the federation (torch) loads where it runs: driving a driver actor needs no torch
    from sylva_ray.engine.federation import Federation, FederationState

log = logging.getLogger(__name__)


class Session(Protocol):
    """A federation as the runner sees it, wherever it lives."""

    @property
    def status(self) -> dict[str, Any]: ...
    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]: ...
    def phase2(self, out_dir: Path) -> dict[str, Any]: ...
    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]: ...


class LocalSession:
    """A ``Federation`` in this process (its executor decides where client work runs)."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation

    @property
    def status(self) -> dict[str, Any]:
        return {
            "next_round": self.federation.state.next_round,
            "rounds": self.federation.cfg.federation.rounds,
            "done": self.federation.done,
        }

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        return self.federation.run_round(evaluate=evaluate)

    def phase2(self, out_dir: Path) -> dict[str, Any]:
        return phase2_of(self.federation, out_dir)

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return self.federation.finish(phase2)


def phase2_of(federation: Federation, out_dir: Path) -> dict[str, Any]:
    """Phase 2 on a federation's final global adapter and client states, results into ``out_dir``."""
    from sylva_ray.engine.phase2 import run_phase2

    st = federation.state
    if not st.last_eval:
        raise RuntimeError("Phase 2 needs a finished Phase 1 (no evaluation recorded yet)")
    return run_phase2(
        federation.cfg,
        federation.executor,
        federation.info.players,
        st.global_adapter,
        st.client_states,
        st.last_eval,
        out_dir,
        progress=federation.progress_bar,
    )


def complete(session: Session, cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """After the last round: Phase 2 (when enabled) on Phase 1's result, then the summary."""
    phase2 = session.phase2(run_dir) if cfg.layer_selection.enabled else None
    summary = session.finish(phase2)
    log.info(
        "seconds by stage: %s",
        ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in summary["seconds_by_stage"].items()),
    )
    return summary


def drive(
    session: Session, cfg: ExperimentConfig, run_dir: Path, stop_after: Optional[int] = None, progress: bool = True
) -> Optional[dict[str, Any]]:
    """Phase 1 with a progress bar, then ``complete``; None if stopped after ``stop_after`` rounds
    (as an interruption would: the checkpoint is written after every round)."""
    status = session.status
    start, total = status["next_round"], status["rounds"]
    with tqdm(total=total, initial=start, desc="phase 1 rounds", disable=not progress) as bar:
        for done_rounds in range(start + 1, total + 1):
            summary = session.run_round()
            bar.update(1)
            bar.set_postfix({k: f"{summary[k]:.3f}" for k in ("clean_acc", "robust_acc") if k in summary})
            if stop_after is not None and done_rounds >= stop_after and done_rounds < total:
                log.info("stopping after round %d (checkpoint written)", done_rounds)
                return None
    return complete(session, cfg, run_dir)


def check_resumable(run_dir: Path, cfg: ExperimentConfig) -> Optional[FederationState]:
    """Before anything starts: the checkpoint is readable and belongs to *this* config (a hand-edited
    config.yaml would otherwise overwrite results with another experiment's), the partition is
    readable. Returns the checkpoint's state, or None when the run has none yet."""
    from sylva_ray.engine.federation import (
        CHECKPOINT_NAME,
        FederationState,
        config_fingerprint,
        fingerprint_differences,
        partition_fingerprint,
    )

    partition = run_dir / "partition.json"
    if partition.is_file():
        try:
            json.loads(partition.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{partition}: not valid JSON ({exc}); the file is damaged") from None
    checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return None
    state = FederationState.load(checkpoint)
    if not state.fingerprint:
        log.warning("%s predates configuration fingerprints: config.yaml cannot be checked against it", checkpoint)
        return state
    current = config_fingerprint(cfg)
    if partition.is_file():  # the weights' digest is checked by the driver, once it has built the model
        current.update(partition_fingerprint(run_dir))
    saved = {k: v for k, v in state.fingerprint.items() if k in current}
    differences = fingerprint_differences(saved, current)
    if differences:
        raise ConfigError(
            f"{run_dir}: config.yaml (or partition.json) differs from what the run's checkpoint was made with, "
            "so resuming would mix two experiments:\n  "
            + "\n  ".join(differences)
            + "\nrestore the run's files, or start a new run with these values"
        )
    return state


def restore_tables(run_dir: Path, state: "FederationState") -> None:
    """metrics.csv and rounds.csv as the checkpoint holds them (rewritten only if they differ)."""
    for name, rows in (("metrics.csv", state.rows), ("rounds.csv", state.round_rows)):
        path = run_dir / name
        expected = pd.DataFrame(rows).to_csv(index=False)
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != expected:
            log.warning("%s did not match the checkpoint: rewritten from it", path)
            write_table(path, pd.DataFrame(rows))
