"""``sylva-ray bench startup``: cold start and memory of a run, in fresh processes, as ratios.

Each measurement is a fresh ``python -m sylva_ray.experiments.bench.startup_child`` process (see there):
the plain in-process loop (no Ray) and the Ray engine with 1 and 2 client actors, run alternately,
``repeats`` times each, on the same workload (``STARTUP_WORKLOAD`` over the given config). While it
runs, a thread of this process samples the child's whole process tree (Ray's processes are its
descendants: GCS, raylet, the driver and client actors) every ``SAMPLE_INTERVAL_S`` with psutil, at
the lowest CPU priority (``TreeSampler.run`` says why):

    first_model_s   process start -> the first aggregated model (round 1 checkpointed)
    wall_s          process start -> process exit (Ray's shutdown included)
    s_per_round     the steady rounds: (last round's end - first round's end) / (rounds - 1)
    peak_pss_mib    the largest sum of PSS over the tree (shared pages counted once, pro rata)
    cpu_s           user + system CPU seconds of every process: the child's own reading of its tree at
                    the last round's end, or the sampler's (teardown included) if larger

``bench_startup.csv`` holds the medians per variant and the ratios to the plain loop;
``bench_startup_runs.csv`` every run; ``bench_startup_processes.csv`` the breakdown, per kind of
process (median over the runs): how many there were and their PSS at the moment of the peak, and
the CPU seconds each had used when the first aggregated model existed (read by the child itself
at that moment). ``bench_startup_imports.csv``: per role (main, driver, client, plain loop), in a
fresh process, the seconds and memory of its imports and the seconds of its init.
Timings come from wall clocks of whole
processes on a shared machine: read them as ratios measured side by side, not as constants.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import psutil
import yaml

from sylva_ray.base.config import ConfigError
from sylva_ray.base.storage import atomic_write_text, atomic_write_with
from sylva_ray.experiments.bench.startup_child import process_kind

log = logging.getLogger(__name__)

#: The measured workload, applied over the given config: digits, 10 clients, Dirichlet 0.5,
#: the pico ViT from random init, LoRA r8 alpha 16 on qkv, PGD-3 at eps 8/255, CE on the adversarial
#: batch, FedAvg, 3 rounds, one torch thread per worker (a plain loop and each actor get one core).
STARTUP_WORKLOAD = [
    "algorithm.name=fedavg_lora_at",
    "data.alpha=0.5",
    "data.public_fraction=0",
    "model.pretrained=none",
    "lora.alpha=16",
    "attack.eps=0.031373",
    "attack.train_steps=3",
    "attack.train_step_size=0.007843",
    "federation.rounds=3",
    "runtime.torch_threads=1",
]
#: (variant name, engine, client actors); the plain loop is the reference of every ratio.
VARIANTS = [("plain loop", "plain", 0), ("ray, 1 actor", "ray", 1), ("ray, 2 actors", "ray", 2)]
#: Seconds between two samples of the process tree, and the sampling thread's niceness (lowest priority).
SAMPLE_INTERVAL_S, SAMPLER_NICENESS = 0.5, 19
#: A measured process that runs longer than this is killed and the bench fails.
CHILD_TIMEOUT_S = 900.0
BYTES_PER_MIB = 1024 * 1024
COLUMNS = [
    "variant",
    "actors",
    "first_model_s",
    "wall_s",
    "s_per_round",
    "peak_pss_mib",
    "cpu_s",
    "first_model_vs_plain",
    "s_per_round_vs_plain",
]


@dataclass
class TreeSampler:
    """Samples a process tree: its peak summed PSS, what each kind held then, CPU seconds per pid."""

    root: psutil.Process
    peak_pss: int = 0
    peak_kinds: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)
    samples: int = 0

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total, kinds = 0, {}
        for process in tree:
            try:
                name = process_kind(process, self.root.pid)
                pss = process.memory_full_info().pss
                times = process.cpu_times()
            except psutil.Error:  # exited between the listing and the read
                continue
            self.cpu[process.pid] = times.user + times.system
            total += pss
            kind = kinds.setdefault(name, {"processes": 0, "pss_mib": 0.0})
            kind["processes"] += 1
            kind["pss_mib"] += pss / BYTES_PER_MIB
        self.samples += 1
        if total > self.peak_pss:
            self.peak_pss, self.peak_kinds = total, kinds

    def run(self, done: threading.Event) -> None:
        """Sample until ``done``, in a thread at the lowest CPU priority.

        Reading one process's PSS (``/proc/<pid>/smaps_rollup``) walks its page tables: ~18 ms for a
        process that imported torch, ~0.1 s for a whole Ray run's tree, so sampling it at normal
        priority would take a large share of a core from the very processes being timed. At nice 19
        (Linux sets it per thread) the sampler runs on what the measured processes leave, so under
        load samples come seconds apart (``samples`` in the runs table counts them); memory is flat
        through the rounds, where the peak is, so a late sample still finds it. One sample sums
        reads made over ~0.1 s, and PSS shares each page with every process mapping it, also
        outside the tree: the measuring process imports no torch for that reason.
        """
        with contextlib.suppress(OSError, AttributeError):  # not Linux: sample at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAMPLER_NICENESS)
        while not done.is_set():
            self.sample()
            done.wait(SAMPLE_INTERVAL_S)


def measure(
    engine: str, actors: int, config_file: Path, workdir: Path
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """One fresh child process: its figures and what each kind of process held at the peak."""
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.jsonl"
    command = [
        sys.executable,
        "-m",
        "sylva_ray.experiments.bench.startup_child",
        "--variant",
        engine,
        "--actors",
        str(actors),
        "--events",
        str(events),
        "--out",
        str(workdir / "run"),
        "--config",
        str(config_file),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cold, local start
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    log_file = workdir / "child.log"
    started = time.time()
    with log_file.open("w") as log_handle:
        child = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(psutil.Process(child.pid))
        done = threading.Event()
        thread = threading.Thread(target=sampler.run, args=(done,), name="pss-sampler", daemon=True)
        thread.start()
        try:
            child.wait(timeout=CHILD_TIMEOUT_S)
            ended = time.time()
        except subprocess.TimeoutExpired:
            child.kill()
            raise RuntimeError(
                f"bench startup: {engine} with {actors} actors ran over {CHILD_TIMEOUT_S:.0f}s; see {log_file}"
            ) from None
        finally:
            done.set()
            thread.join()
    if child.returncode != 0:
        raise RuntimeError(
            f"bench startup: {engine} with {actors} actors exited with {child.returncode}; its output is in "
            f"{log_file}:\n{log_file.read_text()[-3000:]}"
        )
    rounds = [json.loads(line) for line in events.read_text().splitlines()]
    ends = [r["unix_s"] for r in rounds]
    kinds = {kind: dict(held) for kind, held in sampler.peak_kinds.items()}
    for kind, seconds in rounds[0]["cpu_s_by_process"].items():
        kinds.setdefault(kind, {"processes": 0, "pss_mib": 0.0})["cpu_s_to_first_model"] = seconds
    # CPU: the child's own reading at the last round's end (exact), or the sampler's last sight of
    # each process where that is more (Ray's teardown, after the rounds), whichever is larger.
    cpu_s = max(sum(rounds[-1]["cpu_s_by_process"].values()), sum(sampler.cpu.values()))
    figures = {
        "first_model_s": ends[0] - started,
        "wall_s": ended - started,
        "s_per_round": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan"),
        "peak_pss_mib": sampler.peak_pss / BYTES_PER_MIB,
        "cpu_s": cpu_s,
        "samples": sampler.samples,
        "processes_at_peak": sum(k["processes"] for k in sampler.peak_kinds.values()),
    }
    return figures, kinds


#: What each kind of process does before it can work (``bench_startup_imports.csv``), as Python
#: statements run in a fresh interpreter: (imports, untimed setup, init). The Ray run's main process
#: imports no torch, then checks the config (timm's meta model in a child process while it loads the
#: digits via scikit-learn) and splits the data; the driver imports its round loop and stages the
#: pre-trained weights; a client actor imports, then builds its model; the plain loop does all of that
#: in one process.
_WORKLOAD = "from sylva_ray.engine.resolve import load_config; cfg = load_config(config_file=CONFIG)"
_SOURCE = _WORKLOAD + "; from sylva_ray.method.data import load_source, make_partition; source = load_source(cfg.data)"
_INPUTS = (
    _SOURCE + "; from sylva_ray.method.pretrained import pretrained_backbone_state; "
    "partition = make_partition(source, cfg.data, cfg.runtime.seed); "
    "state = pretrained_backbone_state(cfg.model, cfg.data, source)"
)
_TIMM = "from sylva_ray.method.models import timm_library; timm_library()"
ROLES = {
    "main process (ray run)": (
        "import ray, sklearn.datasets, sylva_ray.distributed.launcher, sylva_ray.engine.preflight",
        _WORKLOAD,
        "import pathlib, tempfile; from sylva_ray.distributed.connect import check_before_start; "
        "from sylva_ray.engine.rundir import prepare_data; check_before_start(cfg, torch_free=True); "
        "source, partition = prepare_data(cfg, pathlib.Path(tempfile.mkdtemp()), False)",
    ),
    "driver actor": (
        "import ray, sylva_ray.distributed.actors, sylva_ray.distributed.executor, sylva_ray.distributed.staging, "
        "sylva_ray.engine.federation",
        _SOURCE,
        "from sylva_ray.distributed.staging import staged_backbone; staged_backbone(cfg, source)",
    ),
    "client actor": (
        "import ray, peft, torchattacks, sylva_ray.distributed.client_host; " + _TIMM,
        _INPUTS,
        "from sylva_ray.engine.client import ClientWorker; ClientWorker(cfg, source, partition, state)",
    ),
    "plain loop": (
        "import peft, torchattacks, sklearn.datasets, sylva_ray.engine.federation, sylva_ray.engine.preflight; "
        + _TIMM,
        _WORKLOAD,
        "import pathlib, tempfile; from sylva_ray.distributed.connect import check_before_start; "
        "from sylva_ray.engine.rundir import prepare_data; from sylva_ray.engine.client import ClientWorker; "
        "check_before_start(cfg); source, partition = prepare_data(cfg, pathlib.Path(tempfile.mkdtemp()), False); "
        "ClientWorker(cfg, source, partition)",
    ),
}
ROLE_PROBE = """
import sys, time
import psutil
imports, setup, init, config = sys.argv[1:5]
scope = {"CONFIG": config}
started = time.perf_counter()
exec(imports, scope)
import_s = time.perf_counter() - started
after_imports = psutil.Process().memory_full_info()
exec(setup, scope)
started = time.perf_counter()
exec(init, scope)
init_s = time.perf_counter() - started
print(import_s, after_imports.uss / 2**20, after_imports.rss / 2**20, init_s)
"""


def role_costs(config_file: Path, repeats: int) -> pd.DataFrame:
    """Per role, in a fresh interpreter (median of ``repeats``): seconds of its imports, its private
    (USS) and resident memory after them, and seconds of its init (checks, data, model build)."""
    rows = []
    for role, (imports, setup, init) in ROLES.items():
        samples = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", ROLE_PROBE, imports, setup, init, str(config_file)],
                capture_output=True,
                text=True,
                check=True,
            )
            samples.append([float(x) for x in out.stdout.split()[-4:]])
        import_s, uss, rss, init_s = pd.DataFrame(samples).median()
        rows.append({"role": role, "import_s": import_s, "uss_mib": uss, "rss_mib": rss, "init_s": init_s})
    return pd.DataFrame(rows).round(2)


def resolved_config(preset: str, config_file: Optional[str], overrides: list[str]) -> str:
    """The resolved workload as YAML, from a fresh ``sylva-ray config`` process.

    This process stays free of torch and the model libraries on purpose: PSS divides each shared
    page among the processes mapping it, so a measuring process holding the same libraries as the
    measured ones would take a share of their memory out of the figures.
    """
    command = [sys.executable, "-m", "sylva_ray", "config", "--preset", preset]
    command += ["--config", config_file] if config_file else []
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError((done.stderr.strip().splitlines() or ["sylva-ray config failed"])[-1])
    return done.stdout


def default_out() -> Path:
    return Path("runs") / f"bench-startup-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_with(path, lambda tmp: frame.to_csv(tmp, index=False))


def bench_startup(
    preset: str = "default",
    config_file: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    out: Optional[Path] = None,
    repeats: int = 2,
) -> pd.DataFrame:
    """The three variants, alternating, ``repeats`` times, on ``STARTUP_WORKLOAD`` over the given
    config (``overrides`` last); writes every table into ``out`` and returns the summary."""
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: give at least 1")
    text = resolved_config(preset, config_file, [*STARTUP_WORKLOAD, *(overrides or [])])
    if yaml.safe_load(text)["federation"]["rounds"] < 2:
        raise ConfigError("bench startup: federation.rounds must be >= 2 to time a steady round")
    if "torch" in sys.modules:
        log.warning("bench startup: this process has imported torch; the children's PSS is understated")
    out = Path(out) if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    config_file_out = out / "config.yaml"
    atomic_write_text(config_file_out, text)  # the workload every child resolves
    runs, kinds = [], []
    for repeat in range(repeats):
        for variant, engine, actors in VARIANTS:
            log.info("bench startup: %s (repeat %d/%d)", variant, repeat + 1, repeats)
            figures, peak_kinds = measure(engine, actors, config_file_out, out / f"{repeat}-{engine}-{actors}")
            runs.append({"variant": variant, "actors": actors, "repeat": repeat, **figures})
            kinds += [
                {"variant": variant, "repeat": repeat, "process": kind, **held} for kind, held in peak_kinds.items()
            ]
            log.info("bench startup: %s %s", variant, {k: round(v, 2) for k, v in figures.items()})
    run_frame = pd.DataFrame(runs)
    write_csv(out / "bench_startup_runs.csv", run_frame.round(3))
    processes = (
        pd.DataFrame(kinds)
        .groupby(["variant", "process"], sort=False)[["processes", "pss_mib", "cpu_s_to_first_model"]]
        .median()
        .reset_index()
        .sort_values(["variant", "pss_mib"], ascending=[True, False])
    )
    write_csv(out / "bench_startup_processes.csv", processes.round(1))
    write_csv(out / "bench_startup_imports.csv", role_costs(config_file_out, repeats))
    summary = summarize(run_frame)
    write_csv(out / "bench_startup.csv", summary)
    # Last, once every child has been measured: the event writer imports torch into this process.
    from sylva_ray.engine.tracking import log_table

    log_table(out, "bench_startup", summary)
    log.info("bench startup written to %s", out / "bench_startup.csv")
    return summary


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians per variant (in ``VARIANTS`` order) and the ratios to the plain loop's medians."""
    figures = ["first_model_s", "wall_s", "s_per_round", "peak_pss_mib", "cpu_s"]
    medians = runs.groupby(["variant", "actors"], sort=False)[figures].median().reset_index()
    plain = medians.loc[medians["actors"] == 0].iloc[0]
    medians["first_model_vs_plain"] = medians["first_model_s"] / plain["first_model_s"]
    medians["s_per_round_vs_plain"] = medians["s_per_round"] / plain["s_per_round"]
    return medians[COLUMNS].round(3)
