"""A run in the order a reader expects: Phase 1 round by round, then Phase 2, then the summary.

The same calls drive a federation in this process (``LocalSession``) and one that lives in a driver
actor (``distributed.actors.DriverHandle``): each is a ``Session``. Whether a run directory may be
resumed is decided before anything starts, by ``engine.checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig

if TYPE_CHECKING:  # the federation (torch) loads where it runs: driving a driver actor needs no torch
    from sylva_ray.engine.federation import Federation

log = logging.getLogger(__name__)


class Session(Protocol):
    """A federation as the runner sees it, wherever it lives."""

    @property
    def status(self) -> dict[str, Any]: ...
    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]: ...
    def run_phase2(self, out_dir: Path) -> dict[str, Any]: ...
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

    def run_phase2(self, out_dir: Path) -> dict[str, Any]:
        return self.federation.run_phase2(out_dir)

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return self.federation.finish(phase2)


def complete(session: Session, cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """After the last round: Phase 2 (when enabled) on Phase 1's result, then the summary."""
    phase2 = session.run_phase2(run_dir) if cfg.layer_selection.enabled else None
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
