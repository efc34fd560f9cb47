"""The GPU side of a cluster run: precision, determinism, memory sizing, out-of-memory, Phase 2 affinity.

What can be checked on this CPU-only machine is checked here for real (bf16 autocast runs on the
CPU too, the deterministic resize is compared with torch's, the OOM path uses torch's own error
type through real actors). What needs CUDA is in the ``gpu``-marked tests at the bottom: they are
skipped here and run on the first machine with a GPU.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_training import ATTACK, TRAIN, objective

from sylva_ray.base.config import ConfigError, DataConfig, LoRAConfig, ModelConfig
from sylva_ray.base.precision import (
    CUBLAS_WORKSPACE_CONFIG,
    configure_runtime,
    training_precision,
)
from sylva_ray.cli import explain
from sylva_ray.distributed.connect import check_local_device
from sylva_ray.distributed.launcher import resume, run
from sylva_ray.distributed.placement import GPUMemoryError, PoolPlan
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.federation import CHECKPOINT_NAME, FederationState
from sylva_ray.engine.jobs import Job
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.cost import estimate_actor_memory
from sylva_ray.method.data import load_source
from sylva_ray.method.models import (
    add_lora,
    bilinear_resize_by_matmul,
    build_pretrained_model,
    encode_state,
)
from sylva_ray.method.training import adversarial_round, evaluate

CPU = torch.device("cpu")


@pytest.fixture
def model():
    source = load_source(DataConfig())
    torch.manual_seed(0)
    return add_lora(build_pretrained_model(ModelConfig(pretrained="none"), DataConfig(), source), LoRAConfig(rank=4))


@pytest.mark.parametrize("size", [(16, 16), (224, 224), (20, 12), (5, 7)])
def test_matmul_resize_is_torchs_bilinear_resize_values_and_gradients(size):
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    reference = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    ours = bilinear_resize_by_matmul(images, size)
    torch.testing.assert_close(ours, reference)
    weights = torch.rand_like(reference)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), images)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), images)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_bf16_autocast_changes_training_and_evaluation_stays_fp32(model, tiny_dataset):
    from sylva_ray.base.config import LossConfig
    from sylva_ray.method.models import load_adapter_state, personal_state, shared_state

    start = {**shared_state(model), **personal_state(model)}
    trained = {}
    for precision in ("fp32", "bf16"):
        load_adapter_state(model, start)
        metrics = adversarial_round(
            model, tiny_dataset, objective(LossConfig(), tiny_dataset), TRAIN, seed=1, device=CPU, precision=precision
        )
        assert np.isfinite(metrics.loss)
        trained[precision] = shared_state(model)
    assert any(not torch.equal(trained["fp32"][k], trained["bf16"][k]) for k in trained["fp32"])  # autocast really ran
    outside = evaluate(model, tiny_dataset, ATTACK, 16, seed=3, device=CPU)
    with training_precision("bf16", CPU):  # even inside a bf16 region, evaluation attacks run in fp32
        inside = evaluate(model, tiny_dataset, ATTACK, 16, seed=3, device=CPU)
    assert inside == outside


def test_deterministic_runtime_sets_torch_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_runtime("tf32", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        configure_runtime("fp32", deterministic=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_precision_is_validated():
    with pytest.raises(ConfigError, match="runtime.precision"):
        load_config("smoke", overrides=["runtime.precision=fp16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_it_fails_before_any_work(ray_cluster, tmp_path, monkeypatch, caplog):
    from sylva_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--preset", "smoke", "--set", "runtime.device=cuda", "--out", str(tmp_path / "run")]) == 2
    assert "runtime.device='cuda'" in caplog.text and "no CUDA device" in caplog.text
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    with pytest.raises(ConfigError, match="no CUDA device"):
        check_local_device(load_config("smoke", overrides=["runtime.device=cuda", "runtime.engine=inprocess"]))


def test_cuda_is_not_refused_where_a_cluster_decides(monkeypatch):
    """Inside a `ray job submit` job (RAY_ADDRESS set) or with --address, the actors' GPU share decides."""
    cuda = load_config("smoke", overrides=["runtime.device=cuda"])
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    check_local_device(cuda)
    monkeypatch.delenv("RAY_ADDRESS")
    check_local_device(load_config("smoke", overrides=["runtime.device=cuda", "runtime.address=10.0.0.1:6379"]))


def test_user_errors_are_explained_also_through_rays_wrappers():
    from sylva_ray.distributed.placement import PlacementError
    from sylva_ray.method.data import PartitionError

    assert explain(PartitionError("data.num_clients=500: too few samples")) == "data.num_clients=500: too few samples"
    actor_died = RuntimeError(
        "The actor died because of an error raised in its creation task\n  File x\n"
        "sylva_ray.distributed.placement.PlacementError: runtime.client_resources: no node offers {'GPU': 2.0}\n"
    )
    assert explain(actor_died) == "runtime.client_resources: no node offers {'GPU': 2.0}"
    assert explain(KeyError("a bug")) is None  # a bug keeps its traceback
    assert explain(PlacementError("x")) == "x"


def test_memory_estimate_is_linear_in_the_batch_and_names_its_inputs():
    small = estimate_actor_memory(
        load_config("smoke", overrides=["train.batch_size=8", "train.eval_batch_size=16"]), (3, 8, 8), 10
    )
    large = estimate_actor_memory(
        load_config("smoke", overrides=["train.batch_size=16", "train.eval_batch_size=32"]), (3, 8, 8), 10
    )
    assert small["activation_mb_per_sample_train"] == large["activation_mb_per_sample_train"] > 0
    growth = large["train_peak_gb"] - small["train_peak_gb"]
    assert growth == pytest.approx(
        2 * 8 * large["activation_mb_per_sample_train"] / 1024, abs=0.01
    )  # two forwards x 8 more
    assert {"model", "precision", "train_batch", "eval_batch", "needs_gb_with_headroom"} <= set(large)


@pytest.mark.slow
def test_an_out_of_memory_error_stops_the_run_at_once_and_keeps_the_checkpoint(ray_cluster, tmp_path):
    """One injected CUDA OOM (torch's own error type, raised inside the actor's training job) in
    round 2: no retry (a retry would succeed, the drill fires once), the run stops with the fields to
    change, round 1's checkpoint and tables are intact, and resume finishes the run."""
    cfg = load_config(
        "smoke",
        overrides=[
            "runtime.num_actors=2",
            "federation.rounds=2",
            "layer_selection.enabled=false",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
        ],
    )
    run_dir = tmp_path / "oom"
    run_dir.mkdir()
    with pytest.raises(GPUMemoryError) as caught:
        run(cfg, run_dir, faults={"ooms": {(1, 2): 1}}, progress=False)
    message = explain(caught.value)
    for field in (
        "runtime.client_resources.num_gpus",
        "model.name='vit_pico_patch4_16'",
        "train.batch_size=32",
        "train.eval_batch_size",
    ):
        assert field in message
    assert FederationState.load(run_dir / "checkpoints" / CHECKPOINT_NAME).next_round == 1
    assert pd.read_csv(run_dir / "rounds.csv")["round"].tolist() == [0]
    assert not (run_dir / "summary.json").exists()
    summary = resume(run_dir, progress=False)
    assert summary["dropped_client_rounds"] == 0 and (run_dir / "summary.json").is_file()


def test_phase2_sends_each_clients_coalitions_to_one_actor(ray_cluster, tmp_path):
    """Client c's coalition jobs all run on actor c % 2 (its game is built once there, and its
    tailoring goes there too); the protocol runs wherever an actor is free and reports each job as
    it ends; summary rows stay free of machine-dependent fields."""
    import ray

    from sylva_ray.distributed.actors import RayExecutor, start_client_actors
    from sylva_ray.engine.rundir import prepare_data
    from sylva_ray.method.models import pretrained_backbone_state

    cfg = load_config(
        "smoke",
        overrides=[
            "layer_selection.coalition_steps=1",
            "layer_selection.finetune_steps=1",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
        ],
    )
    source, partition = prepare_data(cfg, tmp_path, resume=False)
    plan = PoolPlan(size=2, actor_options={"num_cpus": 1}, gpu_fraction=0.0, wanted=2)
    inputs = (ray.put(source), ray.put(pretrained_backbone_state(cfg.model, cfg.data, source)))
    executor = RayExecutor(cfg, start_client_actors(cfg, plan, inputs[0], partition, inputs[1]))
    try:
        info = executor.info()
        payload = encode_state(info.initial_adapter)
        state = ClientState(personal=info.initial_personal)
        jobs = [Job(client, state, mask=mask) for mask in range(3) for client in range(4)]
        done = []
        outcomes = executor.coalitions(jobs, payload, on_done=done.append)
        tailored = executor.tailor([Job(client, state, players=[0]) for client in range(4)], payload)
        scored = executor.protocol(
            [Job(o.client_id, state, players=[0], tuned=o.upload) for o in tailored], payload, on_done=done.append
        )
    finally:
        executor.shutdown()
    assert all(o.ok for o in outcomes + tailored + scored)
    assert len(done) == len(jobs) + len(scored)  # every finished job was reported once (progress bars)
    assert all("actor_pid" not in o.metrics for o in scored)  # these become summary.json's per-client rows
    assert all(0 <= o.metrics["clean_acc"] <= 1 for o in scored)
    pids = {}
    for outcome in outcomes:
        pids.setdefault(outcome.client_id, set()).add(int(outcome.metrics["actor_pid"]))
    assert all(len(p) == 1 for p in pids.values()), pids
    assert pids[0] == pids[2] != pids[1] == pids[3]


# --- on a machine with CUDA ----------------------------------------------------------------------
GPU_SMOKE = [
    "runtime.device=cuda",
    "runtime.client_resources={num_cpus: 1, num_gpus: 0.5}",
    "runtime.num_actors=2",
    "federation.rounds=2",
    "evaluation.autoattack=false",
    "evaluation.sanity_checks=false",
]


@pytest.mark.gpu
def test_gpu_run_records_peak_memory_per_round(ray_cluster, tmp_path):
    run_dir = tmp_path / "gpu"
    run_dir.mkdir()
    run(load_config("smoke", overrides=GPU_SMOKE), run_dir, progress=False)
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert (rounds["gpu_peak_mb_max"] > 0).all()
    assert (pd.read_csv(run_dir / "metrics.csv")["gpu_peak_mb"].dropna() > 0).all()


@pytest.mark.gpu
def test_deterministic_gpu_runs_repeat_bit_for_bit(ray_cluster, tmp_path):
    finals = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        run(load_config("smoke", overrides=[*GPU_SMOKE, "runtime.deterministic=true"]), run_dir, progress=False)
        finals.append(json.loads((run_dir / "summary.json").read_text())["per_client"])
    assert finals[0] == finals[1]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_trains_on_the_gpu(ray_cluster, tmp_path, precision):
    run_dir = tmp_path / precision
    run_dir.mkdir()
    summary = run(
        load_config("smoke", overrides=[*GPU_SMOKE, f"runtime.precision={precision}"]), run_dir, progress=False
    )
    assert 0 <= summary["final"]["robust_acc"] <= summary["final"]["clean_acc"] <= 1


@pytest.mark.gpu
def test_a_real_cuda_oom_is_reported_not_retried(ray_cluster, tmp_path):
    huge = [
        *GPU_SMOKE,
        "model.kwargs={img_size: 512, embed_dim: 1024, depth: 24, num_heads: 16}",
        "train.batch_size=4096",
    ]
    run_dir = tmp_path / "huge"
    run_dir.mkdir()
    with pytest.raises(GPUMemoryError, match="train.batch_size=4096"):
        run(load_config("smoke", overrides=huge), run_dir, progress=False)
