"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``): autoscaling, placement across
nodes, a node lost mid-round, a request nothing can hold. The scenarios run in a process of their
own (``tests/helpers/cluster_scenarios.py``: a process joins one Ray cluster, and this session has one);
the single-node reference runs here, on the session's cluster, and the two are compared.

The nodes declare logical GPUs: this checks scheduling, not CUDA (see ``test_gpu_paths.py``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sylva_ray.distributed.launcher import run
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import CHECKPOINT_NAME

ROOT = Path(__file__).resolve().parents[2]
#: Columns that measure the machine or the placement, not the experiment.
MACHINE_COLUMNS = ["train_seconds", "actor_rss_mb", "actor_pid", "actor_node", "seconds", "attempts", "eval_attempts"]
#: Seconds the whole scenario process may take before the test gives up on it (not a speed check).
SCENARIO_LIMIT_S = 1500

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenarios(ray_cluster, tmp_path_factory):
    """Run every scenario once; ``ray_cluster`` first, so a cluster token exists in ~/.ray."""
    out = tmp_path_factory.mktemp("multinode")
    env = dict(os.environ, RAY_AUTH_MODE="token")  # every node with token authentication, as cluster/*.yaml set it
    # As on a node nobody prepared: whatever a process sees of the GPUs, it sees by Ray's doing and ours.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.cluster_scenarios", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCENARIO_LIMIT_S,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text())


def _metrics(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return (
        frame.drop(columns=[c for c in MACHINE_COLUMNS if c in frame])
        .sort_values(["round", "client"])
        .reset_index(drop=True)
    )


def test_a_zero_cpu_head_waits_for_the_autoscaler_then_runs(scenarios):
    _, results = scenarios
    autoscale = results["autoscale"]
    assert autoscale["exit_code"] == 0, autoscale["errors"]
    # the run asked for exactly its pool: 2 actors of 1 CPU + half a GPU, the GPU share kept
    assert autoscale["request"] == [{"CPU": 1.0, "GPU": 0.5}] * 2
    assert autoscale["nodes_launched"] == 1  # one {CPU: 2, GPU: 1} node holds both
    assert autoscale["request_after_run"] == []  # withdrawn once the actors held their resources
    assert autoscale["submit_to_first_round_s"] is not None
    assert autoscale["summary"]["final"]["clean_acc"] > autoscale["summary"]["sanity"]["majority_rate"]
    assert autoscale["alive_nodes"] == 2  # the head and the one launched worker


def test_a_request_no_node_can_hold_fails_within_its_timeout(scenarios):
    _, results = scenarios
    impossible = results["impossible"]
    assert impossible["exit_code"] == 2
    assert "runtime.client_resources" in impossible["errors"] and "no node offers {'GPU': 2.0}" in impossible["errors"]
    assert "Traceback" not in impossible["errors"]
    # it waited for its 5 s timeout, not for the 900 s default (a behaviour check, not a speed one)
    assert 5 <= impossible["seconds"] < 300
    assert impossible["request_after_run"] == []


def test_actors_on_both_workers_give_the_single_node_results(scenarios, tmp_path):
    out, results = scenarios
    multinode = results["multinode"]
    assert multinode["exit_code"] == 0, multinode["errors"]
    assert len(multinode["nodes"]) == 2 and all(len(pids) == 2 for pids in multinode["nodes"].values())
    single = tmp_path / "single"
    single.mkdir()
    # the session's one-node cluster cannot grow and has no GPU: the GPU share is dropped, 2 actors
    run(
        load_config(
            "smoke",
            overrides=[
                "runtime.client_resources={num_cpus: 1, num_gpus: 0.5}",
                "runtime.num_actors=4",
                "evaluation.autoattack=false",
                "evaluation.sanity_checks=false",
            ],
        ),
        single,
        progress=False,
    )
    pd.testing.assert_frame_equal(_metrics(out / "multinode"), _metrics(single))
    spread = json.loads((out / "multinode" / "summary.json").read_text())
    assert spread["final"] == json.loads((single / "summary.json").read_text())["final"]


def test_an_actor_without_a_gpu_share_sees_no_gpu_on_a_gpu_node(scenarios):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0: the actor must hide the GPUs itself."""
    _, results = scenarios
    seen = results["gpu_visibility"]
    assert seen["no_share"]["cuda_visible_devices"] == "" and seen["no_share"]["ray_gpu_ids"] == []
    assert seen["no_share"]["device"] == "cpu"
    # the control: an actor with a share is shown its (logical) GPU by Ray
    assert seen["half_gpu"]["ray_gpu_ids"] == ["0"] and seen["half_gpu"]["cuda_visible_devices"] == "0"


def test_a_worker_lost_mid_round_is_survived_and_the_run_resumes(scenarios):
    out, results = scenarios
    loss = results["node_loss"]
    assert loss["removed"] and loss["removed_after_rounds"] >= 1
    assert loss["error"] is None and loss["stopped_early"] and loss["rows_before_resume"] == 3
    assert loss["resume_exit_code"] == 0, loss["resume_errors"]
    run_dir = out / "node_loss"
    for name in (
        "config.yaml",
        "partition.json",
        "metrics.csv",
        "rounds.csv",
        "summary.json",
        f"checkpoints/{CHECKPOINT_NAME}",
        "shapley.csv",
        "models/client_0000.safetensors",
        "models/phase2_client_0003.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(metrics["round"].unique()) == [0, 1, 2, 3]
    hit = metrics[metrics["round"] == loss["removed_after_rounds"]]
    # the lost node's clients were retried on the surviving actors (training or evaluation), or dropped
    retried = (hit["attempts"].fillna(1) > 1) | (hit["eval_attempts"].fillna(1) > 1)
    assert retried.any() or hit["dropped"].fillna(False).astype(bool).any()
    assert metrics.loc[metrics["round"] > loss["removed_after_rounds"], "actor_node"].nunique() == 1  # one worker left
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dropped_client_rounds"] == int(metrics["dropped"].fillna(False).astype(bool).sum())


def test_a_runs_summary_holds_nothing_that_depends_on_the_machine(scenarios):
    """The same run on one node and on two: summary.json's per-client rows are equal too."""
    out, _ = scenarios
    rows = json.loads((out / "multinode" / "summary.json").read_text())["per_client"]
    assert rows and not any(key in row for row in rows for key in MACHINE_COLUMNS)
