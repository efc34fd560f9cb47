"""Multi-node and autoscaling scenarios on one machine, with Ray's own ``ray.cluster_utils.Cluster``.

Run by ``tests/e2e/test_multinode.py`` in a process of its own (a process joins one Ray cluster, and
the test session already has one): ``python -m tests.helpers.cluster_scenarios OUT_DIR`` from the
repository root; writes
``OUT_DIR/results.json``. The nodes declare *logical* GPUs: this checks scheduling (bundles,
per-node fit, waiting for capacity), not CUDA, which this machine does not have.

The cluster starts as a 0-CPU head, like a fresh ``ray up`` cluster. A stand-in for the autoscaler
reads the resource request the run leaves with Ray (``request_resources`` stores it in the GCS
key-value store, where Ray's autoscaler monitor reads it) and adds as many worker nodes of one type
as that request needs, after a boot delay. Then:

1. autoscale: ``sylva-ray run --preset smoke --address ...`` asking for GPU shares waits, then runs;
2. impossible: a request no node type can hold fails within ``runtime.resource_timeout_s``;
3. multinode: with a second worker, a run places actors on both workers and finishes;
4. node_loss: a worker node is removed mid-round; the run goes on, is interrupted, and resumes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray
from ray.cluster_utils import Cluster

from sylva_ray.cli import main as cli_main
from sylva_ray.distributed.actors import start_client_actors
from sylva_ray.distributed.launcher import run, stage_inputs
from sylva_ray.distributed.placement import PoolPlan, capacity
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import prepare_data
from tests.helpers.cli_capture import run_captured

#: The worker node type the stand-in autoscaler launches: a g5.xlarge in miniature (logical GPU).
WORKER_NODE = {"num_cpus": 2, "num_gpus": 1}
WORKER_NODE_RESOURCES = {"CPU": 2.0, "GPU": 1.0}
#: Seconds the stand-in autoscaler takes to "boot" a node once it has seen a request.
BOOT_DELAY_S = 3.0
#: What the runs ask for: half a (logical) GPU and a CPU per client actor, two actors per worker.
GPU_SHARES = "runtime.client_resources={num_cpus: 1, num_gpus: 0.5}"
#: The scenarios check scheduling: the clients compute on the CPU even where Ray hands them a real
#: GPU's id (a logical GPU "0" is the host's GPU 0 on a GPU machine), so figures match the reference.
CPU_COMPUTE = "runtime.device=cpu"
#: Short fault budgets so a lost node costs seconds, not minutes, here.
FAST_FAULTS = ["runtime.actor_restart_timeout_s=10", "runtime.resource_timeout_s=60", "runtime.resource_settle_s=5"]
#: The final-model protocol (AutoAttack, sanity attacks) tests nothing about placement: off here.
NO_PROTOCOL = ["evaluation.autoattack=false", "evaluation.sanity_checks=false"]
POLL_S = 0.2


def smoke_args(out: Path, address: str, *extra: str) -> list[str]:
    """``sylva-ray run --preset smoke --address ADDRESS`` with GPU shares and ``extra`` --set items."""
    return [
        "--log-level",
        "WARNING",
        "run",
        "--preset",
        "smoke",
        "--address",
        address,
        "--out",
        str(out),
        "--set",
        GPU_SHARES,
        "--set",
        CPU_COMPUTE,
        *(flag for item in extra for flag in ("--set", item)),
    ]


def read_request() -> list[dict[str, float]]:
    """The bundles the run asked the autoscaler for (Ray's v1 autoscaler channel in the GCS KV store)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return [dict(b) for b in json.loads(raw)] if raw else []


class Background(threading.Thread):
    """A run in a thread of its own: the main thread must stay free for node changes (Ray's
    ``Cluster.add_node``/``remove_node`` install signal handlers, which only the main thread may)."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.target, self.result, self.error = target, None, None

    def run(self) -> None:
        try:
            self.result = self.target()
        except BaseException as exc:  # reported by the scenario, not lost in the thread
            self.error = exc


def autoscale_while(job: Background, cluster: Cluster, record: dict[str, Any]) -> None:
    """The stand-in autoscaler: while ``job`` runs, launch worker nodes until the requested bundles fit."""
    started = time.monotonic()
    record.update(nodes_launched=0, request=[], request_seen_s=None)
    while job.is_alive():
        bundles = read_request()
        if bundles:
            if record["request_seen_s"] is None:
                record.update(request_seen_s=time.monotonic() - started, request=bundles)
            nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
            fits_a_node = all(WORKER_NODE_RESOURCES.get(k, 0.0) >= v for k, v in bundles[0].items())
            if fits_a_node and capacity(nodes, bundles[0]) < len(bundles):
                time.sleep(BOOT_DELAY_S)
                cluster.add_node(**WORKER_NODE)
                record["nodes_launched"] += 1
                continue
        time.sleep(POLL_S)


def run_cli(args: list[str]) -> tuple[int, str, float]:
    """``sylva-ray`` in this process; returns its exit code, what it logged at ERROR, and seconds."""
    return run_captured(cli_main, args)


def first_round_after(run_dir: Path, started: float, done: threading.Event, found: dict) -> None:
    """Record when rounds.csv first appears (written after round 1)."""
    while not done.is_set():
        if (run_dir / "rounds.csv").is_file():
            found["seconds"] = time.monotonic() - started
            return
        time.sleep(POLL_S)


def remove_mid_round(job: Background, cluster: Cluster, node: Any, run_dir: Path, record: dict[str, Any]) -> None:
    """Remove ``node`` once round 1 is on disk, while round 2 runs."""
    while job.is_alive():
        rounds = run_dir / "rounds.csv"
        if rounds.is_file() and len(pd.read_csv(rounds)) >= 1:
            time.sleep(1.0)
            record["removed_after_rounds"] = int(len(pd.read_csv(rounds)))
            cluster.remove_node(node)
            record["removed"] = True
            return
        time.sleep(POLL_S)


def node_of_actor_pids(run_dir: Path) -> dict[str, list[int]]:
    frame = pd.read_csv(run_dir / "metrics.csv")
    frame = frame.dropna(subset=["actor_node"])
    return {
        str(node): sorted(int(p) for p in group["actor_pid"].unique()) for node, group in frame.groupby("actor_node")
    }


def gpu_visibility(address: str) -> dict[str, dict[str, Any]]:
    """What a real client actor sees on these (logical-)GPU nodes, with and without a GPU share:
    one without must see no GPU at all (Ray 2.60 no longer hides them from it)."""
    cfg = load_config("smoke", overrides=[f"runtime.address={address}", CPU_COMPUTE])
    with tempfile.TemporaryDirectory() as tmp:
        source, partition = prepare_data(cfg, Path(tmp), resume=False)
    staged = stage_inputs(cfg, source)
    plans = {
        "no_share": PoolPlan(size=1, actor_options={"num_cpus": 1}, gpu_fraction=0.0, wanted=1),
        "half_gpu": PoolPlan(size=1, actor_options={"num_cpus": 1, "num_gpus": 0.5}, gpu_fraction=0.5, wanted=1),
    }
    seen = {}
    for name, plan in plans.items():
        [actor] = start_client_actors(cfg, plan, staged.source, partition, staged.backbone)
        try:
            seen[name] = ray.get(actor.runtime.remote())
        finally:
            ray.kill(actor, no_restart=True)
    return seen


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    address = cluster.address
    ray.init(address=address)  # sylva-ray's connect() then joins this session, as `--address` would
    try:
        # 1. autoscale: 0-CPU head, no workers; the run must ask, wait, then finish.
        run_dir, record, first, done = out / "autoscale", {}, {}, threading.Event()
        # (Ray's read-only autoscaler on this head reports no launches: the settle time covers the boot delay)
        job = Background(
            lambda: run_cli(
                smoke_args(
                    run_dir,
                    address,
                    "runtime.num_actors=2",
                    "layer_selection.enabled=false",
                    *NO_PROTOCOL,
                    *FAST_FAULTS,
                    "runtime.resource_settle_s=30",
                )
            )
        )
        watcher = threading.Thread(target=first_round_after, args=(run_dir, time.monotonic(), done, first), daemon=True)
        job.start()
        watcher.start()
        autoscale_while(job, cluster, record)
        job.join()
        done.set()
        code, errors, seconds = job.result if job.error is None else (None, repr(job.error), None)
        record.update(
            exit_code=code,
            errors=errors,
            seconds=seconds,
            submit_to_first_round_s=first.get("seconds"),
            request_after_run=read_request(),
            alive_nodes=sum(n["Alive"] for n in ray.nodes()),
            summary=json.loads((run_dir / "summary.json").read_text()) if code == 0 else None,
        )
        results["autoscale"] = record

        # 2. impossible: two GPUs per actor on one-GPU nodes; fails within the timeout, nothing launched.
        code, errors, seconds = run_cli(
            smoke_args(
                out / "impossible",
                address,
                "runtime.client_resources={num_cpus: 1, num_gpus: 2}",
                "runtime.resource_timeout_s=5",
            )
        )
        results["impossible"] = {
            "exit_code": code,
            "errors": errors,
            "seconds": seconds,
            "request_after_run": read_request(),
            "files": sorted(p.name for p in (out / "impossible").rglob("*")),
        }

        # 3. multinode: a second worker; 4 actors at half a GPU fill both.
        second = cluster.add_node(**WORKER_NODE)
        run_dir = out / "multinode"
        code, errors, seconds = run_cli(
            smoke_args(run_dir, address, "runtime.num_actors=4", *NO_PROTOCOL, *FAST_FAULTS)
        )
        results["multinode"] = {
            "exit_code": code,
            "errors": errors,
            "seconds": seconds,
            "nodes": node_of_actor_pids(run_dir) if code == 0 else {},
        }

        # 3b. gpu_visibility: on these GPU nodes, an actor without a GPU share sees none.
        results["gpu_visibility"] = gpu_visibility(address)

        # 4. node_loss: remove the second worker while round 2 runs; interrupted after round 3; resumed.
        run_dir, record = out / "node_loss", {}
        cfg = load_config(
            "smoke",
            overrides=[
                GPU_SHARES,
                CPU_COMPUTE,
                f"runtime.address={address}",
                "runtime.num_actors=4",
                "federation.rounds=4",
                *NO_PROTOCOL,
                *FAST_FAULTS,
            ],
        )
        run_dir.mkdir()
        started = time.monotonic()
        job = Background(lambda: run(cfg, run_dir, stop_after=3, progress=False))  # an interruption after round 3
        job.start()
        remove_mid_round(job, cluster, second, run_dir, record)
        job.join()
        record.update(
            stopped_early=job.error is None and job.result is None,
            error=repr(job.error) if job.error else None,
            seconds=time.monotonic() - started,
            rows_before_resume=len(pd.read_csv(run_dir / "rounds.csv")),
        )
        code, errors, seconds = run_cli(["--log-level", "WARNING", "resume", str(run_dir)])
        record.update(resume_exit_code=code, resume_errors=errors, resume_seconds=seconds)
        results["node_loss"] = record
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
