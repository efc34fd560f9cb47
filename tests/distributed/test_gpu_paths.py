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
from sylva_ray.engine.checkpoint import FederationState
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.jobs import Job
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import CHECKPOINT_NAME
from sylva_ray.method.cost import estimate_actor_memory
from sylva_ray.method.data import load_source
from sylva_ray.method.evaluation import evaluate
from sylva_ray.method.models import add_lora, bilinear_resize_by_matmul
from sylva_ray.method.pretrained import build_pretrained_model
from sylva_ray.method.training import adversarial_round
from sylva_ray.method.wire import encode_state
from tests.method.test_training import ATTACK, TRAIN, objective

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


def test_deterministic_runtime_sets_torch_and_cublas_and_a_later_run_turns_it_off(monkeypatch):
    """A process that runs several runs in turn (in-process runs, notebooks, benches) must not keep
    the previous run's deterministic kernels."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_runtime("tf32", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
        configure_runtime("fp32", deterministic=False)  # the next run's settings, nothing else
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


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
    from tests.helpers.faults import drill

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
        run(cfg, run_dir, actor_classes=drill(ooms={(1, 2): 1}), progress=False)
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

    from sylva_ray.distributed.actors import start_client_actors
    from sylva_ray.distributed.executor import RayExecutor
    from sylva_ray.engine.rundir import prepare_data
    from sylva_ray.method.pretrained import pretrained_backbone_state

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
            [Job(o.client_id, state, players=[0], tuned=o.tuned) for o in tailored], payload, on_done=done.append
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


# --- on a machine with CUDA: `pytest -q -m gpu`, a session of its own --------------------------
GPU_SMOKE = [
    "runtime.device=cuda",
    "runtime.client_resources={num_cpus: 1, num_gpus: 0.5}",
    "runtime.num_actors=2",
    "federation.rounds=2",
    "evaluation.autoattack=false",
    "evaluation.sanity_checks=false",
]
#: Every stage whose jobs run on the client actors, and so decide whether a GPU share fits.
GPU_STAGES = {"train", "evaluation", "phase2_game", "tailoring", "protocol"}


@pytest.mark.gpu
def test_gpu_run_records_peak_memory_per_round(ray_cluster, tmp_path):
    run_dir = tmp_path / "gpu"
    run_dir.mkdir()
    run(load_config("smoke", overrides=GPU_SMOKE), run_dir, progress=False)
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert (rounds["gpu_peak_mb_max"] > 0).all()
    assert (pd.read_csv(run_dir / "metrics.csv")["gpu_peak_mb"].dropna() > 0).all()


@pytest.mark.gpu
def test_the_whole_protocol_runs_on_the_gpu_and_every_stage_records_its_peak(ray_cluster, tmp_path):
    """Phase 2 and the final protocol with the reference AutoAttack and the sanity attacks, on CUDA;
    each stage's largest job's GPU memory lands in summary.json (none in the per-client rows)."""
    run_dir = tmp_path / "protocol"
    run_dir.mkdir()
    overrides = [o for o in GPU_SMOKE if not o.startswith("evaluation.")] + ["evaluation.autoattack_max_samples=8"]
    summary = run(load_config("smoke", overrides=overrides), run_dir, progress=False)
    peaks = summary["gpu_peak_mb_by_stage"]
    assert set(peaks) == GPU_STAGES and all(peak > 0 for peak in peaks.values()), peaks
    assert all("gpu_peak_mb" not in row for row in summary["per_client"])
    assert 0 <= summary["final"]["autoattack_acc"] <= summary["final"]["clean_acc"] <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_the_precision_and_determinism_flags_reach_the_actor(ray_cluster, tmp_path, precision):
    """Read back inside a real client actor on the GPU: the device, the memory cap of its share and
    the torch switches its config asks for (a flag that never reached the actor would fail here)."""
    import ray

    from sylva_ray.distributed.actors import start_client_actors
    from sylva_ray.distributed.launcher import stage_inputs
    from sylva_ray.distributed.placement import CUDA_CONTEXT_RESERVE_BYTES
    from sylva_ray.engine.rundir import prepare_data

    deterministic = precision == "tf32"
    cfg = load_config(
        "smoke", overrides=[*GPU_SMOKE, f"runtime.precision={precision}", f"runtime.deterministic={deterministic}"]
    )
    source, partition = prepare_data(cfg, tmp_path, resume=False)
    staged = stage_inputs(cfg, source)
    plan = PoolPlan(size=1, actor_options={"num_cpus": 1, "num_gpus": 0.5}, gpu_fraction=0.5, wanted=1)
    [actor] = start_client_actors(cfg, plan, staged.source, partition, staged.backbone)
    try:
        seen = ray.get(actor.runtime.remote())
    finally:
        ray.kill(actor, no_restart=True)
    card = torch.cuda.get_device_properties(0).total_memory
    assert seen["device"] == "cuda:0" and seen["ray_gpu_ids"] and seen["cuda_visible_devices"]
    assert seen["allow_tf32"] is (precision == "tf32") and seen["cudnn_allow_tf32"] is (precision == "tf32")
    assert seen["deterministic"] is deterministic and seen["cudnn_deterministic"] is deterministic
    assert seen["memory_cap_bytes"] == pytest.approx(0.5 * card - CUDA_CONTEXT_RESERVE_BYTES, rel=1e-6)


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


#: A pico ViT at 448 px with 4-px patches: 12,544 tokens, ~1 MB of weights, hundreds of MB of
#: activations per image under PGD training, so a client's first batch (every one of its ~100
#: digits) needs tens of GB: more than a quarter of any card, while the weights fit easily.
HUGE_ACTIVATIONS = [
    "model.pretrained=none",  # no pre-training in the test process (it would run on the CPU)
    "system.clock=false",  # no memory estimate either (CPU forwards of this model in actor 0)
    "model.kwargs={img_size: 448}",
    "train.batch_size=4096",
]


@pytest.mark.gpu
def test_a_real_cuda_oom_is_reported_not_retried(ray_cluster, tmp_path):
    quarter = [o for o in GPU_SMOKE if "client_resources" not in o] + [
        "runtime.client_resources={num_cpus: 1, num_gpus: 0.25}"
    ]
    run_dir = tmp_path / "huge"
    run_dir.mkdir()
    with pytest.raises(GPUMemoryError, match="train.batch_size=4096") as caught:
        run(load_config("smoke", overrides=[*quarter, *HUGE_ACTIVATIONS]), run_dir, progress=False)
    assert "'s train job" in str(caught.value)  # during training, not at start-up: the weights fitted
    assert not (run_dir / "summary.json").exists()


@pytest.mark.gpu
def test_a_model_too_large_for_its_share_fails_at_start_up_in_one_line(ray_cluster, tmp_path):
    """ViT-L/16's 1.2 GB of fp32 weights on a share that leaves torch about 0.5 GiB: the actor
    cannot build its model; the run stops at once with the named error, not an ActorDiedError."""
    card = torch.cuda.get_device_properties(0).total_memory
    share = round(1.5 * 1024**3 / card, 4)
    overrides = [o for o in GPU_SMOKE if "client_resources" not in o] + [
        f"runtime.client_resources={{num_cpus: 1, num_gpus: {share}}}",
        "model.name=vit_large_patch16_224",
        "model.pretrained=none",
        "system.clock=false",
        "layer_selection.enabled=false",
    ]
    run_dir = tmp_path / "large"
    run_dir.mkdir()
    with pytest.raises(GPUMemoryError) as caught:
        run(load_config("smoke", overrides=overrides), run_dir, progress=False)
    message = explain(caught.value)
    assert message.startswith("CUDA out of memory in start-up (building the model)") and "\n" not in message
    assert f"runtime.client_resources.num_gpus={share:g}" in message


# --- CPU tests are CPU tests wherever they run (the session itself) ------------------------------
def test_this_cpu_session_and_its_cluster_see_no_gpu(ray_cluster, pytestconfig):
    """Outside `pytest -m gpu` the suite hides the GPUs from itself and everything it starts, and
    its Ray cluster has none: on a GPU host, every CPU test computes where it does here."""
    import os

    from tests.conftest import is_gpu_session

    assert not is_gpu_session(pytestconfig)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    assert ray_cluster.cluster_resources().get("GPU", 0) == 0


# --- start-up failures: one line, before round 1 ---------------------------------------------------
def test_an_actor_that_cannot_start_stops_the_run_with_one_line(ray_cluster, tmp_path):
    """Actor 1's constructor refuses its input (here: CUDA asked for where there is none); actor 0
    is fine. The pool's first call names actor 1 and the field at once, instead of round 1 dropping
    its clients after retries."""
    import ray

    from sylva_ray.distributed.client_actor import RemoteClientActor
    from sylva_ray.distributed.executor import RayExecutor
    from sylva_ray.distributed.launcher import stage_inputs
    from sylva_ray.distributed.placement import ActorStartError
    from sylva_ray.engine.rundir import prepare_data

    cfg = load_config("smoke", overrides=["evaluation.autoattack=false", "evaluation.sanity_checks=false"])
    broken = load_config("smoke", overrides=["runtime.device=cuda"])
    source, partition = prepare_data(cfg, tmp_path, resume=False)
    staged = stage_inputs(cfg, source)
    actors = [
        RemoteClientActor.options(num_cpus=1, max_restarts=3).remote(
            cfg, staged.source, partition, [staged.backbone], 1, 0.0
        ),
        RemoteClientActor.options(num_cpus=1, max_restarts=3).remote(
            broken, staged.source, partition, [staged.backbone], 1, 0.0
        ),
    ]
    executor = RayExecutor(cfg, actors)
    try:
        with pytest.raises(ActorStartError) as caught:
            executor.info()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    message = explain(caught.value)
    assert message.startswith("client actor 1 could not start: runtime.device='cuda'")
    assert "\n" not in message and "Traceback" not in message


def test_cuda_allocation_failures_are_named_and_others_are_not():
    from sylva_ray.distributed.client_host import as_gpu_memory_error

    cfg = load_config("smoke")
    oom = as_gpu_memory_error(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"), cfg, None, "start-up", 0.25
    )
    assert isinstance(oom, GPUMemoryError)
    assert str(oom).startswith("CUDA out of memory in start-up: this actor may use 0.25")
    assert "train.batch_size" in str(oom)
    cublas = as_gpu_memory_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED"), cfg, 3, "train", 0.5)
    assert "client 3's train job" in str(cublas)
    assert as_gpu_memory_error(RuntimeError("shape mismatch"), cfg, 3, "train", 0.5) is None


# --- compare's parallel runs: seeded sections do not interleave -------------------------------------
def test_seeded_blocks_in_parallel_threads_draw_what_they_draw_alone():
    import threading

    from sylva_ray.base.seeding import torch_seeded

    def draws() -> list[float]:
        out = []
        for _ in range(200):
            with torch_seeded(7):
                out.append(float(torch.rand(64).sum()))
                out.append(float(torch.randn(256).sum()))
        return out

    alone = draws()
    results: dict[int, list[float]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, draws())) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i] == alone for i in range(4))


@pytest.mark.slow
def test_parallel_same_seed_runs_start_from_the_same_weights_and_repeat(ray_cluster, tmp_path):
    """`compare` runs several run()s in threads; with a fresh initialisation (model.pretrained=none)
    two same-seed runs at once must build the same backbone and give the same figures."""
    import threading

    from sylva_ray.distributed.launcher import run

    cfg = load_config(
        "smoke",
        overrides=[
            "model.pretrained=none",
            "runtime.num_actors=1",
            "federation.rounds=1",
            "layer_selection.enabled=false",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
        ],
    )
    summaries: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            (tmp_path / name).mkdir()
            summaries[name] = run(cfg, tmp_path / name, progress=False)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    digests = {
        name: FederationState.load(tmp_path / name / "checkpoints" / CHECKPOINT_NAME).fingerprint[
            "inputs.weights_sha256"
        ]
        for name in ("a", "b")
    }
    assert digests["a"] == digests["b"]
    assert summaries["a"]["per_client"] == summaries["b"]["per_client"]


# --- smaller items ----------------------------------------------------------------------------------
def test_the_engine_bench_legs_compute_where_the_plain_loop_does():
    """On a GPU host the Ray legs hold a GPU share each (the bench's own cluster sees the GPU, and a
    leg without a share would be refused); on a CPU they say so and ask for none."""
    from sylva_ray.distributed.placement import gpu_problem
    from sylva_ray.experiments.bench.engine import engine_leg_config

    cfg = load_config("smoke")
    two = engine_leg_config(cfg, 2, cuda=True)
    assert two.runtime.device == "cuda" and two.runtime.client_resources["num_gpus"] == 0.5
    assert two.runtime.num_actors == 2 and two.runtime.torch_threads == 1
    assert gpu_problem(two.runtime.client_resources, two.runtime.device, cluster_gpus=1) is None
    cpu = engine_leg_config(
        load_config("smoke", overrides=["runtime.client_resources={num_cpus: 1, num_gpus: 0.5}"]), 1, cuda=False
    )
    assert cpu.runtime.device == "cpu" and "num_gpus" not in cpu.runtime.client_resources
    assert gpu_problem(cpu.runtime.client_resources, cpu.runtime.device, cluster_gpus=1) is None


def test_deterministic_training_on_a_gpu_refuses_layers_without_a_deterministic_backward():
    from sylva_ray.engine.model_checks import determinism_problems, meta_model

    resnet = load_config("smoke", overrides=["model.name=resnet18", "runtime.deterministic=true"])
    model, problems = meta_model(resnet)
    assert not problems
    [problem] = determinism_problems(resnet, model)
    assert "runtime.deterministic = true" in problem and "global_pool.pool (AdaptiveAvgPool2d)" in problem
    on_cpu = load_config("smoke", overrides=["model.name=resnet18", "runtime.deterministic=true", "runtime.device=cpu"])
    assert determinism_problems(on_cpu, model) == []
    vit = load_config("smoke", overrides=["runtime.deterministic=true"])
    assert determinism_problems(vit, meta_model(vit)[0]) == []
