"""A run's checkpoint: what it holds, how it is written and read, and whether a resume may use it.

The federation writes one checkpoint after every round (``RUN/checkpoints/checkpoint.pt``). It is
read once per resume, by ``check_resumable``, before anything starts; the state it returns is
handed to the ``Federation`` that continues the run (in this process, or in the driver actor
through Ray's object store). A checkpoint carries a *fingerprint* of the experiment that made it,
so a resume refuses to continue it with another config, another partition or other weights:
results of two experiments never mix in one run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.base.storage import atomic_write_with
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.rundir import CHECKPOINT_NAME, write_table
from sylva_ray.method.wire import damaged_file_message

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

#: Fields a resume may change (``sylva-ray resume --address/--dashboard``, the trackers): where the
#: run executes and who watches it, not what it computes; every other resolved field in config.yaml
#: must be what the checkpoint was made with.
RESUMABLE_FIELDS = frozenset(
    {
        "runtime.address",
        "runtime.dashboard",
        "tracking.tensorboard",
        "tracking.mlflow_uri",
        "tracking.mlflow_experiment",
    }
)
#: Dict-valued fields compared whole, as values.
_OPAQUE = frozenset({"kwargs", "client_resources", "devices", "device_classes", "network_classes"})
#: Fingerprint keys of the run's inputs beyond its config (checked once the worker is built).
INPUTS_PREFIX = "inputs."


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


@dataclass
class FederationState:
    """Everything needed to continue a run: what a checkpoint holds."""

    next_round: int
    global_adapter: State
    client_states: dict[int, ClientState]
    rows: list[dict[str, Any]] = field(default_factory=list)
    round_rows: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    last_eval: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    protocol_seconds: float = 0.0  # of ``seconds``: the final-model protocol, when Phase 1's models are final
    global_eval: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the experiment this state belongs to

    def save(self, path: Path) -> None:
        """One file, written atomically; loadable with ``torch.load(weights_only=True)``."""
        payload = {
            "next_round": self.next_round,
            "global_adapter": self.global_adapter,
            "personal": {str(c): s.personal for c, s in self.client_states.items()},
            "rounds_trained": {str(c): s.rounds_trained for c, s in self.client_states.items()},
            "tables": json.dumps(
                {
                    "rows": self.rows,
                    "round_rows": self.round_rows,
                    "last_eval": self.last_eval,
                    "initial": self.initial,
                    "global_eval": self.global_eval,
                    "warnings": self.warnings,
                }
            ),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "seconds": self.seconds,
            "protocol_seconds": self.protocol_seconds,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        atomic_write_with(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: Path) -> "FederationState":
        """Read a checkpoint (``weights_only``: never arbitrary pickles); a damaged one is a
        ``ConfigError`` naming the file."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return cls._from_payload(payload, json.loads(payload["tables"]))
        except Exception as exc:  # zip, pickle, torch, JSON and key errors all mean the same here
            raise ConfigError(
                damaged_file_message(f"checkpoint {path}", exc) + "; resume cannot continue from it"
            ) from None

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], tables: dict[str, Any]) -> "FederationState":
        return cls(
            next_round=int(payload["next_round"]),
            global_adapter=payload["global_adapter"],
            client_states={
                int(c): ClientState(personal=p, rounds_trained=int(payload["rounds_trained"][c]))
                for c, p in payload["personal"].items()
            },
            rows=tables["rows"],
            round_rows=tables["round_rows"],
            last_eval=tables["last_eval"],
            initial=tables["initial"],
            global_eval=tables["global_eval"],
            warnings=tables["warnings"],
            bytes_up=int(payload["bytes_up"]),
            bytes_down=int(payload["bytes_down"]),
            seconds=float(payload["seconds"]),
            protocol_seconds=float(payload["protocol_seconds"]),
            fingerprint=json.loads(payload["fingerprint"]),
        )


# --- fingerprints ---------------------------------------------------------------------------------
def config_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved configuration as ``{dotted field: value}`` (JSON values), less RESUMABLE_FIELDS."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.rsplit(".", 1)[-1] not in _OPAQUE:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", cfg.to_dict())
    return {k: v for k, v in json.loads(json.dumps(flat, default=str)).items() if k not in RESUMABLE_FIELDS}


def partition_fingerprint(run_dir: Path) -> dict[str, str]:
    """The partition file's digest ("" before the run wrote one)."""
    partition = Path(run_dir) / "partition.json"
    digest = hashlib.sha256(partition.read_bytes()).hexdigest() if partition.is_file() else ""
    return {f"{INPUTS_PREFIX}partition_sha256": digest}


def run_fingerprint(cfg: ExperimentConfig, run_dir: Path, backbone_digest: str) -> dict[str, Any]:
    """The experiment a run directory holds: its config, its partition file and its weights."""
    return {
        **config_fingerprint(cfg),
        **partition_fingerprint(run_dir),
        f"{INPUTS_PREFIX}weights_sha256": backbone_digest,
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: value at the checkpoint -> value now`` for every field that differs.

    A field the checkpoint does not know (added to the schema after it was made) at its default
    is not a difference: the default is what the code that made it did (e.g. no adversary)."""
    defaults = config_fingerprint(ExperimentConfig())
    return [
        f"{key}: {saved.get(key)!r} when the checkpoint was made, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
        and not (key not in saved and key in defaults and current.get(key) == defaults[key])
    ]


# --- resume checks ---------------------------------------------------------------------------------
def check_resumable(run_dir: Path, cfg: ExperimentConfig) -> Optional[FederationState]:
    """Before anything starts: the checkpoint is readable and belongs to *this* config (a hand-edited
    config.yaml would otherwise overwrite results with another experiment's), the partition is
    readable. Returns the checkpoint's state (the one read of it), or None when the run has none yet."""
    partition = Path(run_dir) / "partition.json"
    if partition.is_file():
        try:
            json.loads(partition.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{partition}: not valid JSON ({exc}); the file is damaged") from None
    checkpoint = checkpoint_path(run_dir)
    if not checkpoint.is_file():
        return None
    state = FederationState.load(checkpoint)
    current = config_fingerprint(cfg)
    if partition.is_file():  # the weights' digest is checked by the federation, once it has built the model
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


def check_inputs(state: FederationState, current: dict[str, Any], run_dir: Path) -> None:
    """What only a built worker knows, checked against the checkpoint: the weights and the partition
    (the config was checked where the run was resumed; Phase 2 alone may change its own fields)."""
    inputs = {k: v for k, v in current.items() if k.startswith(INPUTS_PREFIX)}
    saved = {k: v for k, v in state.fingerprint.items() if k.startswith(INPUTS_PREFIX)}
    differences = fingerprint_differences(saved, inputs)
    if differences:
        raise ConfigError(
            f"{checkpoint_path(run_dir)} was made with other inputs than this resume has, so it would mix two "
            "experiments: " + "; ".join(differences)
        )


def restore_tables(run_dir: Path, state: FederationState) -> None:
    """metrics.csv and rounds.csv as the checkpoint holds them (rewritten only if they differ)."""
    for name, rows in (("metrics.csv", state.rows), ("rounds.csv", state.round_rows)):
        path = Path(run_dir) / name
        expected = pd.DataFrame(rows).to_csv(index=False)
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != expected:
            log.warning("%s did not match the checkpoint: rewritten from it", path)
            write_table(path, pd.DataFrame(rows))
