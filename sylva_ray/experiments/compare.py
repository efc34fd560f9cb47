"""``sylva-ray compare``: algorithms x seeds in the same engine, on the same partitions, one table.

    out/
      compare.yaml                       what was asked (a re-run with other arguments is refused)
      runs/<algorithm>/seed<k>/          a normal run directory each: `sylva-ray resume` works on it
      comparison.csv / comparison.md     one row per algorithm x seed / the paper-style table
      pareto.png, accuracy_vs_upload.png, per_client.png
      threat.csv / threat.md / threat.png  with a threat sweep (--aggregations/--behaviours/--fractions):
                                         runs/<algorithm>/<aggregation>/<behaviour>-<fraction>|clean/seed<k>/

Seed k of every algorithm uses ``runtime.seed = base + k``: the same partition, pre-trained
weights, initial LoRA, participant sampling and attack seeds across algorithms. Runs go to the Ray
cluster in parallel (each is a driver actor with its own client actors, ``--actors-per-run`` of
them), as many at once as the cluster's CPUs/GPUs hold; an interrupted compare re-run with the same
``--out`` skips finished runs and resumes the others from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml
from tqdm.auto import tqdm

from sylva_ray.base.config import ConfigError, ExperimentConfig, apply_overrides
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.distributed.capacity import (
    alive_nodes,
    release_request,
    wait_for_capacity,
)
from sylva_ray.distributed.connect import check_before_start, cluster_can_grow, connect
from sylva_ray.distributed.launcher import resume, run
from sylva_ray.distributed.placement import actor_request, capacity
from sylva_ray.engine.checkpoint import RESUMABLE_FIELDS
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import read_json
from sylva_ray.experiments.comparison_report import RunSpec, ThreatCell, write_report
from sylva_ray.experiments.threat_report import NO_ATTACK
from sylva_ray.method.aggregation import AGGREGATORS
from sylva_ray.method.algorithms import ALGORITHMS, parse_algorithm
from sylva_ray.method.byzantine import BEHAVIOURS, malicious_count

log = logging.getLogger(__name__)

MANIFEST = "compare.yaml"


def plan_runs(base_raw: dict[str, Any], algorithms: list[str], seeds: int, out: Path) -> list[RunSpec]:
    """One validated config per algorithm x seed; every error is raised here, before any run starts."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if not algorithms:
        raise ConfigError(
            f"--algorithms is empty; choose from {sorted(ALGORITHMS.names())} (sylva accepts -ablation suffixes)"
        )
    duplicates = sorted({a for a in algorithms if algorithms.count(a) > 1})
    if duplicates:
        raise ConfigError(f"--algorithms lists {duplicates} twice")
    base_seed = int(base_raw.get("runtime", {}).get("seed", 0))
    specs, problems = [], []
    for spec in algorithms:
        name, ablations = parse_algorithm(spec)
        if name not in ALGORITHMS:
            problems.append(
                f"--algorithms entry {spec!r}: unknown algorithm {name!r}; choose from {sorted(ALGORITHMS.names())}"
            )
            continue
        for k in range(seeds):
            seed = base_seed + k
            raw = apply_overrides(
                base_raw,
                {
                    "algorithm.name": name,
                    "algorithm.ablations": ablations,
                    "runtime.seed": seed,
                    "name": f"{spec}-seed{seed}",
                },
            )
            try:
                cfg = build_config(raw)
                if k == 0:
                    check_before_start(cfg)  # the model, data and weights each algorithm will use
            except ConfigError as exc:
                problems.append(f"--algorithms entry {spec!r}: {exc}")
                break
            specs.append(RunSpec(spec, seed, cfg, out / "runs" / spec / f"seed{seed}"))
    if problems:
        raise ConfigError("\n".join(problems))
    return specs


@dataclass(frozen=True)
class ThreatGrid:
    """``compare``'s threat sweep: every algorithm against every rule under every attack cell.

    The attack-free cell (fraction 0) runs once per algorithm x rule; each behaviour runs at each
    positive fraction. Seed k is the same partition and, at a given fraction, the same malicious
    set for every rule and algorithm (``byzantine.malicious_clients``). The rules' tolerance f is
    fixed across the grid (the largest fraction's count unless ``federation.byzantine_f`` is set),
    so each rule is the same rule with and without attackers.
    """

    aggregations: list[str]
    behaviours: list[str]
    fractions: list[float]

    def cells(self, algorithm: str) -> list[ThreatCell]:
        cells = [ThreatCell(algorithm, agg, NO_ATTACK, 0.0) for agg in self.aggregations] if 0 in self.fractions else []
        cells += [
            ThreatCell(algorithm, agg, behaviour, fraction)
            for agg in self.aggregations
            for behaviour in self.behaviours
            for fraction in self.fractions
            if fraction > 0
        ]
        return cells

    def problems(self) -> list[str]:
        problems = []
        for name, values in (("--aggregations", self.aggregations), ("--behaviours", self.behaviours)):
            if not values:
                problems.append(f"{name} is empty")
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                problems.append(f"{name} lists {duplicates} twice")
        problems += [
            f"--aggregations entry {a!r}: unknown; choose from {AGGREGATORS.names()}"
            for a in self.aggregations
            if a not in AGGREGATORS
        ]
        problems += [
            f"--behaviours entry {b!r}: unknown; choose from {BEHAVIOURS.names()}"
            for b in self.behaviours
            if b not in BEHAVIOURS
        ]
        problems += [f"--fractions entry {f}: give fractions in [0, 1)" for f in self.fractions if not 0 <= f < 1]
        if len(set(self.fractions)) < len(self.fractions):
            problems.append(f"--fractions {self.fractions} lists a fraction twice")
        return problems


def plan_threat_runs(
    base_raw: dict[str, Any], algorithms: list[str], grid: ThreatGrid, seeds: int, out: Path
) -> list[RunSpec]:
    """One validated config per algorithm x threat cell x seed; every error before any run starts."""
    problems = grid.problems()
    if seeds < 1:
        problems.append(f"--seeds {seeds}: give at least 1")
    if not algorithms:
        problems.append(f"--algorithms is empty; choose from {sorted(ALGORITHMS.names())}")
    clients = int(base_raw.get("data", {}).get("num_clients", ExperimentConfig().data.num_clients))
    counts = [malicious_count(clients, f) for f in grid.fractions]
    if len(set(counts)) < len(counts):
        problems.append(
            f"--fractions {grid.fractions}: with {clients} clients they give {counts} malicious clients; "
            "two fractions with one count would run the same cell twice"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    base_seed = int(base_raw.get("runtime", {}).get("seed", 0))
    tolerated = _lookup_f(base_raw)
    specs: list[RunSpec] = []
    for spec in algorithms:
        name, ablations = parse_algorithm(spec)
        if name not in ALGORITHMS:
            problems.append(f"--algorithms entry {spec!r}: unknown algorithm {name!r}")
            continue
        for cell in grid.cells(spec):
            for k in range(seeds):
                seed = base_seed + k
                overrides: dict[str, Any] = {
                    "algorithm.name": name,
                    "algorithm.ablations": ablations,
                    "runtime.seed": seed,
                    "name": f"{spec}-{cell.aggregation}-{cell.behaviour}-{cell.fraction:g}-seed{seed}",
                    "federation.aggregation": cell.aggregation,
                    "adversary.fraction": cell.fraction,
                }
                if cell.behaviour != NO_ATTACK:
                    overrides["adversary.behaviour"] = cell.behaviour
                raw = apply_overrides(base_raw, overrides)
                if tolerated is None:
                    raw = apply_overrides(
                        raw, {"federation.byzantine_f": malicious_count(clients, max(grid.fractions))}
                    )
                try:
                    cfg = build_config(raw)
                    if k == 0 and not specs:
                        check_before_start(cfg)
                except ConfigError as exc:
                    problems.append(f"threat cell {cell.label}: {exc}")
                    break
                if cfg.federation.aggregation != cell.aggregation:  # the algorithm fixes its own rule
                    problems.append(
                        f"--algorithms entry {spec!r} fixes federation.aggregation={cfg.federation.aggregation!r}, "
                        f"so it cannot run under --aggregations {cell.aggregation!r}; sweep the rules with algorithms "
                        "that leave it free (sylva, sylva-no_phase2, fedavg_lora_at)"
                    )
                    break
                folder = "clean" if cell.behaviour == NO_ATTACK else f"{cell.behaviour}-{cell.fraction:g}"
                run_dir = out / "runs" / spec / cell.aggregation / folder / f"seed{seed}"
                specs.append(RunSpec(cell.label, seed, cfg, run_dir, cell))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))  # one line per distinct problem
    return specs


def _lookup_f(raw: dict[str, Any]) -> Any:
    return raw.get("federation", {}).get("byzantine_f")


def request_of(value: Any, key: str) -> Any:
    """What a manifest entry asks for: the base config without where the runs execute and who
    watches them (``RESUMABLE_FIELDS``: ``--address``, ``--dashboard``, the trackers may differ
    when a comparison resumes)."""
    if key != "base_config" or not isinstance(value, dict):
        return value
    request = dict(value)
    for dotted in RESUMABLE_FIELDS:
        section, name = dotted.split(".", 1)
        if isinstance(request.get(section), dict):
            request[section] = {k: v for k, v in request[section].items() if k != name}
    return request


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """A compare folder belongs to one request: refuse to mix results of another into it."""
    path = out / MANIFEST
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        changed = sorted(k for k in manifest if request_of(previous.get(k), k) != request_of(manifest[k], k))
        if changed:
            raise ConfigError(
                f"--out {str(out)!r} holds a comparison with other {changed}; use a new --out, "
                "or repeat the original arguments to resume it"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"--out {str(out)!r} exists, is not empty and is not a comparison folder; choose a new folder"
        )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(manifest, sort_keys=False))


def run_parallelism(
    cfg: ExperimentConfig, actors_per_run: int, max_parallel: Optional[int] = None, progress: bool = True
) -> tuple[int, bool]:
    """How many runs fit the cluster at once, node by node (``placement.capacity``), and whether an
    autoscaler request is outstanding. On a cluster that can grow and has no room for even one
    run yet, room for ``max_parallel`` runs (1 if unset) is asked for and waited on first."""
    if cfg.runtime.engine != "ray":
        return 1, False
    bundle = actor_request(cfg.runtime.client_resources)
    nodes, requested = alive_nodes(), False
    if capacity(nodes, bundle) < actors_per_run and cluster_can_grow() and cfg.runtime.resource_timeout_s > 0:
        nodes, requested = wait_for_capacity(
            bundle,
            actors_per_run * (max_parallel or 1),
            cfg.runtime.resource_timeout_s,
            cfg.runtime.resource_settle_s,
            what="compare's client actors",
            progress=progress,
        )
    return max(1, capacity(nodes, bundle) // actors_per_run), requested


def execute_one(spec: RunSpec, lock: threading.Lock) -> dict[str, Any]:
    """Run, resume or skip one run directory; returns its summary."""
    if (spec.run_dir / "summary.json").is_file():
        return read_json(spec.run_dir / "summary.json")
    with lock:  # creating directories and the config is quick; keep it ordered
        fresh = not (spec.run_dir / "config.yaml").is_file()
        spec.run_dir.mkdir(parents=True, exist_ok=True)
    summary = run(spec.cfg, spec.run_dir, progress=False) if fresh else resume(spec.run_dir, progress=False)
    if summary is None:
        raise RuntimeError(f"{spec.run_dir}: the run stopped before its last round")
    return summary


def prepare_comparison(
    base_raw: dict[str, Any],
    algorithms: list[str],
    seeds: int,
    out: Path,
    reference: Optional[str] = None,
    actors_per_run: int = 1,
    threat: Optional[ThreatGrid] = None,
) -> list[RunSpec]:
    """Check the request and plan its runs, every error before any run starts; claim ``out``."""
    out = Path(out)
    if reference is not None and threat is not None:
        raise ConfigError("--reference applies to an algorithm comparison, not to a threat sweep; drop it")
    if reference is not None and reference not in algorithms:
        raise ConfigError(f"--reference {reference!r} is not among --algorithms {algorithms}")
    if actors_per_run < 1:
        raise ConfigError(f"--actors-per-run {actors_per_run}: give at least 1")
    base_raw = apply_overrides(base_raw, {"runtime.num_actors": actors_per_run})
    if threat is None:
        specs = plan_runs(base_raw, algorithms, seeds, out)
        manifest = {"algorithms": list(algorithms), "seeds": seeds, "base_config": base_raw}
    else:
        specs = plan_threat_runs(base_raw, algorithms, threat, seeds, out)
        manifest = {
            "algorithms": list(algorithms),
            "seeds": seeds,
            "base_config": base_raw,
            "threat": dataclasses.asdict(threat),
        }
    check_manifest(out, manifest)
    return specs


def execute_runs(
    specs: list[RunSpec], actors_per_run: int = 1, max_parallel: Optional[int] = None, desc: str = "compare runs"
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Run (in parallel where the cluster allows), resume or skip each planned run: summaries and
    errors by the run's index in ``specs``. One failed run never loses the others' results."""
    engine = specs[0].cfg.runtime.engine
    if engine == "ray":
        connect(specs[0].cfg.runtime.address, specs[0].cfg.runtime.dashboard)
    parallel, requested = run_parallelism(specs[0].cfg, actors_per_run, max_parallel)
    if max_parallel is not None:
        parallel = max(1, min(parallel, max_parallel))
    log.info("%s: %d runs, %d at a time", desc, len(specs), parallel)

    summaries: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=parallel) as pool, tqdm(total=len(specs), desc=desc) as bar:
        futures = {pool.submit(execute_one, spec, lock): index for index, spec in enumerate(specs)}
        for future in as_completed(futures):
            index = futures[future]
            spec = specs[index]
            try:
                summaries[index] = future.result()
                log.info("done: %s seed %d", spec.algorithm, spec.seed)
            except Exception as exc:  # one failed run must not lose the others' results
                errors[index] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "run %s seed %d failed (%s): resume it with `sylva-ray resume %s`",
                    spec.algorithm,
                    spec.seed,
                    exc,
                    spec.run_dir,
                )
            bar.update(1)
    if requested:
        release_request()
    return summaries, errors


def run_comparison(
    base_raw: dict[str, Any],
    algorithms: list[str],
    seeds: int,
    out: Path,
    reference: Optional[str] = None,
    actors_per_run: int = 1,
    max_parallel: Optional[int] = None,
    threat: Optional[ThreatGrid] = None,
) -> pd.DataFrame:
    """Plan, run (in parallel where the cluster allows), then write the comparison tables and plots.

    ``threat``: sweep malicious fraction x behaviour x aggregation (``ThreatGrid``) as well."""
    out = Path(out)
    specs = prepare_comparison(base_raw, algorithms, seeds, out, reference, actors_per_run, threat)
    log.info("compare: %d algorithms x %d seeds into %s", len(algorithms), seeds, out)
    summaries, errors = execute_runs(specs, actors_per_run, max_parallel)
    frame = write_report(out, specs, summaries, errors, reference)
    if errors:
        raise RuntimeError(
            f"{len(errors)} of {len(specs)} runs failed; see comparison.csv; re-run the same command to resume them"
        )
    return frame
