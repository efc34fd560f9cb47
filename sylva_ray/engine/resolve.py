"""Configuration resolution: from the user's layers to one validated ``ExperimentConfig``.

    built-in defaults -> named preset -> ``--config FILE`` -> ``--set k=v``     (``raw_config``)
    -> schema validation (``base.config``) -> the algorithm's implied settings -> registry and
    cross-field checks                                                          (``build_config``)

It sits above the registries (datasets, partitioners, attacks, aggregators, behaviours,
algorithms) because it checks names against them and asks their entries' facts (a dataset reads
``data.root``; a rule weighs by sample counts); ``base.config`` below stays the schema alone, its
fields naming the registry they look up (``REGISTRIES``).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from sylva_ray.base.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    merge_layers,
    registry_fields,
    validate_schema,
)
from sylva_ray.base.plugins import is_file_entry, load_plugins
from sylva_ray.base.registry import Registry
from sylva_ray.method.aggregation import AGGREGATORS, is_sample_weighted
from sylva_ray.method.algorithms import ALGORITHMS
from sylva_ray.method.attacks import ATTACKS
from sylva_ray.method.byzantine import BEHAVIOURS, malicious_count, tolerated_f
from sylva_ray.method.data import DATASETS, PARTITIONERS
from sylva_ray.method.devices import system_problems
from sylva_ray.method.robust_aggregation import aggregation_problem
from sylva_ray.method.update_space import MIXING, PRE_AGGREGATIONS

log = logging.getLogger(__name__)

#: The registries configuration fields name, by kind (``base.config.registry_name``).
REGISTRIES: dict[str, Registry[Any]] = {
    registry.kind: registry for registry in (DATASETS, PARTITIONERS, ATTACKS, AGGREGATORS, BEHAVIOURS, ALGORITHMS)
}
#: Module-name suffixes that are ambiguous without their parent (``proj`` is also ``patch_embed.proj``).
BARE_SUFFIXES = frozenset({"proj", "qkv", "fc1", "fc2"})
#: Resource names a client actor may ask for, besides ``custom:NAME``.
ACTOR_RESOURCES = frozenset({"num_cpus", "num_gpus", "memory"})
_HOST_PORT = re.compile(r"^(ray://)?(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
MAX_PORT = 65535


def raw_config(
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The user's layers merged, before validation and before any algorithm's implied settings
    (``compare`` derives one config per algorithm from it)."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    raw: dict[str, Any] = copy.deepcopy(PRESETS[preset])
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a YAML mapping at the top level")
        raw = merge_layers(raw, loaded)
    return apply_overrides(raw, list(overrides or []))


def load_config(
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    check_paths: bool = True,
) -> ExperimentConfig:
    """Defaults -> preset -> YAML file -> ``--set`` overrides, validated once at the end."""
    return build_config(raw_config(preset, config_file, overrides), check_paths=check_paths)


def build_config(raw: dict[str, Any], check_paths: bool = True) -> ExperimentConfig:
    """Turn a nested dict into a validated ``ExperimentConfig`` (type checks + cross-field checks).

    The algorithm's implied settings are applied last (they win over the user's layers): a run
    named ``fat`` is FAT whatever the preset says about Sylva's loss; where the user's own value
    loses, a warning says so. Resolution is idempotent, so a run's config.yaml loads back to
    itself. ``check_paths=False`` leaves out the checks of local files and folders, for a process
    on a node that does not read them (a Tune trial gets the data through the object store; the
    sweep's main process checked the paths).
    """
    cfg = validate_schema(raw)
    # Your own registrations first (a file path is kept absolute: actors start elsewhere).
    cfg.runtime.plugins = [str(Path(e).expanduser().resolve()) if is_file_entry(e) else e for e in cfg.runtime.plugins]
    load_plugins(cfg.runtime.plugins)
    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(ALGORITHMS.unknown("algorithm.name", cfg.algorithm.name))
    implied = ALGORITHMS.get(cfg.algorithm.name).implied_settings(cfg.algorithm)
    if implied:
        warn_overridden(cfg.algorithm.name, raw, implied)
        cfg = validate_schema(apply_overrides(cfg.to_dict(), implied))
    problems = semantic_problems(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    warn_idle_gpu_share(cfg)
    return cfg


def warn_idle_gpu_share(cfg: ExperimentConfig) -> None:
    """``runtime.device=cpu`` beside a GPU share books GPUs that no client uses. Allowed (placement
    drills on logical GPUs, CPU-only clients on a GPU node kept apart from its GPU jobs), but said."""
    share = cfg.runtime.client_resources.get("num_gpus", 0.0)
    if cfg.runtime.device == "cpu" and share > 0:
        _warn_once(
            f"runtime.device='cpu' with runtime.client_resources.num_gpus={share:g}: each client actor books "
            "that GPU share but computes on the CPU; drop num_gpus, or set runtime.device=auto to use the GPUs"
        )


_UNSET = object()


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


#: Warnings already given in this process (``compare`` builds one config per seed).
_WARNED: set[str] = set()


def warn_overridden(algorithm: str, raw: dict[str, Any], implied: dict[str, Any]) -> None:
    """Log, once per process, every field the user set that the algorithm's implied settings replace."""
    lost = [
        f"{key}={value!r} (yours: {mine!r})"
        for key, value in implied.items()
        if (mine := _lookup(raw, key)) is not _UNSET and mine != value
    ]
    message = (
        f"algorithm.name={algorithm} fixes {', '.join(lost)}: its values are used "
        "(docs howto/compare.md 'Baselines, ablations' names the algorithm.* fields that set them)"
    )
    if lost:
        _warn_once(message)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def address_problem(address: str) -> Optional[str]:
    """What is wrong with a ``--address`` value, or None (format only; reachability is checked at connect)."""
    if address in {"auto", "local"}:
        return None
    match = _HOST_PORT.match(address)
    if not match:
        return "expected host:port, ray://host:port, auto or local (e.g. 127.0.0.1:6379)"
    if not 0 < int(match.group("port")) <= MAX_PORT:
        return f"port must be between 1 and {MAX_PORT}"
    return None


def field_value(cfg: ExperimentConfig, dotted: str) -> Any:
    """The value of a field by the name ``--set`` gives it (``data.name``)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def semantic_problems(cfg: ExperimentConfig, check_paths: bool = True) -> list[str]:
    """Checks that span fields or need the registries; each message names the field and the fix."""
    problems = [
        REGISTRIES[kind].unknown(where, value)
        for where, kind in registry_fields()
        if (value := field_value(cfg, where)) not in REGISTRIES[kind]
    ]
    accepted = ALGORITHMS.get(cfg.algorithm.name).accepted_ablations
    for ablation in cfg.algorithm.ablations:
        if ablation not in accepted:
            problems.append(
                f"algorithm.ablations entry {ablation!r} does not apply to algorithm.name={cfg.algorithm.name!r}"
                + (f"; it accepts {sorted(accepted)}" if accepted else "; it has no ablations")
            )
    problems += _adversary_problems(cfg)
    problems += system_problems(cfg)
    problems += _path_problems(cfg, check_paths)
    problems += _model_problems(cfg)
    problems += _runtime_problems(cfg)
    return problems


def _adversary_problems(cfg: ExperimentConfig) -> list[str]:
    """The threat and the rule must be possible together, for the number of updates a round gets."""
    problems: list[str] = []
    adversary, federation = cfg.adversary, cfg.federation
    count = malicious_count(cfg.data.num_clients, adversary.fraction)
    if adversary.fraction > 0 and count == 0:
        problems.append(
            f"adversary.fraction = {adversary.fraction}: rounds to 0 of {cfg.data.num_clients} clients; "
            f"use at least 1/{cfg.data.num_clients} = {1 / cfg.data.num_clients:.3g} or set it to 0"
        )
    if count >= cfg.data.num_clients:
        problems.append(
            f"adversary.fraction = {adversary.fraction}: all {cfg.data.num_clients} clients would be malicious, "
            "leaving no honest client to measure; lower it"
        )
    if count and ALGORITHMS.get(cfg.algorithm.name).scope_name == "local":
        problems.append(
            f"adversary.fraction = {adversary.fraction} with algorithm.name={cfg.algorithm.name!r}: it shares "
            "nothing, so malicious uploads cannot reach anyone; use a federated algorithm or set it to 0"
        )
    for step in federation.pre_aggregation:
        if step not in PRE_AGGREGATIONS:
            problems.append(f"federation.pre_aggregation entry {step!r}: unknown; choose from {list(PRE_AGGREGATIONS)}")
    if len(set(federation.pre_aggregation)) < len(federation.pre_aggregation):
        problems.append(f"federation.pre_aggregation = {federation.pre_aggregation}: lists a step twice")
    if MIXING.intersection(federation.pre_aggregation) and is_sample_weighted(federation.aggregation):
        problems.append(
            f"federation.pre_aggregation = {federation.pre_aggregation} with federation.aggregation = "
            f"{federation.aggregation!r}: nnm and bucketing mix updates, so per-client sample counts no longer "
            "apply; use them with a robust rule (e.g. krum, median) or keep only clipping"
        )
    if federation.aggregation in AGGREGATORS:
        participants = max(1, int(round(federation.participation * cfg.data.num_clients)))
        problem = aggregation_problem(federation.aggregation, federation, tolerated_f(cfg), participants)
        if problem:
            problems.append(
                f"federation.aggregation = {federation.aggregation!r}: {problem} per round "
                f"(federation.participation x data.num_clients = {participants}); lower federation.byzantine_f or "
                "adversary.fraction, or raise the participation, the clients, or lower federation.bucket_size"
            )
    if count and adversary.start_round >= cfg.federation.rounds:
        problems.append(
            f"adversary.start_round = {adversary.start_round}: the run has rounds 0..{cfg.federation.rounds - 1}, so "
            "the malicious clients would never attack; lower it below federation.rounds"
        )
    return problems


def _path_problems(cfg: ExperimentConfig, check_paths: bool) -> list[str]:
    problems = []
    dataset = DATASETS.find(cfg.data.name)
    if dataset is not None and dataset.reads_root:
        if not cfg.data.root:
            problems.append(
                f"data.root is required for data.name={cfg.data.name!r}: set --set data.root=/path/to/folder"
            )
        elif check_paths and not Path(cfg.data.root).exists():
            problems.append(
                f"data.root = {cfg.data.root!r}: no such folder or file (nothing is downloaded; put the "
                f"{cfg.data.name} files there)"
            )
    if cfg.model.pretrained == "checkpoint":
        if not cfg.model.checkpoint:
            problems.append(
                "model.checkpoint is required with model.pretrained='checkpoint': "
                "--set model.checkpoint=/path/weights.safetensors"
            )
        elif check_paths and not Path(cfg.model.checkpoint).is_file():
            problems.append(f"model.checkpoint = {cfg.model.checkpoint!r}: no such file")
    return problems


def _model_problems(cfg: ExperimentConfig) -> list[str]:
    problems = []
    if cfg.model.pretrained == "embedded" and cfg.data.public_fraction <= 0:
        problems.append(
            "data.public_fraction = 0 leaves no public slice for model.pretrained='embedded': "
            "set it > 0 or use another source"
        )
    dataset = DATASETS.find(cfg.data.name)
    if cfg.model.pretrained == "embedded" and (dataset is None or not dataset.public_slice):
        sliced = "/".join(name for name in DATASETS.registered() if DATASETS.get(name).public_slice)
        problems.append(
            f"model.pretrained='embedded' pre-trains on a public slice of {sliced} only, "
            f"not {cfg.data.name!r}: use timm or checkpoint"
        )
    if (cfg.model.mean is None) != (cfg.model.std is None):
        problems.append("model.mean and model.std must be given together (or both left unset)")
    for entry in cfg.lora.target_modules:
        if entry.split(".")[-1] == entry and entry in BARE_SUFFIXES:
            problems.append(
                f"lora.target_modules entry {entry!r} is a bare suffix: peft would also match e.g. patch_embed.proj; "
                f"qualify it ('attn.{entry}' or 'mlp.{entry}')"
            )
    return problems


def _runtime_problems(cfg: ExperimentConfig) -> list[str]:
    problems = []
    for key, value in cfg.runtime.client_resources.items():
        if key not in ACTOR_RESOURCES and not key.startswith("custom:"):
            problems.append(
                f"runtime.client_resources.{key}: unknown resource; use num_cpus, num_gpus, memory or custom:NAME"
            )
        if not math.isfinite(value) or value < 0:
            problems.append(f"runtime.client_resources.{key} = {value}: must be a finite number >= 0")
    if not any(v > 0 for v in cfg.runtime.client_resources.values()):
        problems.append(
            "runtime.client_resources needs a positive num_cpus or num_gpus, e.g. {num_cpus: 1}: "
            "without one Ray could start an unbounded number of client actors"
        )
    share = cfg.runtime.client_resources.get("num_gpus", 0.0)
    if share > 1 and not float(share).is_integer():
        problems.append(
            f"runtime.client_resources.num_gpus = {share:g}: a share above 1 must be a whole number of GPUs (Ray "
            f"cannot give one actor a GPU and a part of another); use {math.floor(share)} or {math.ceil(share)}"
        )
    if cfg.runtime.address is not None:
        problem = address_problem(cfg.runtime.address)
        if problem:
            problems.append(f"runtime.address = {cfg.runtime.address!r}: {problem}")
    return problems
