import pytest

from sylva_ray.base.config import ConfigError
from sylva_ray.distributed.placement import (
    GPUMemoryError,
    PlacementError,
    actor_request,
    capacity,
    cuda_memory_fraction,
    fits_on_node,
    gpu_problem,
    plan_pool,
    threads_for,
    trial_gpu_problem,
)
from sylva_ray.engine.resolve import address_problem, load_config

CPU_BOX = {"CPU": 2.0, "memory": 8e9}
GPU_BOX = {"CPU": 16.0, "GPU": 2.0}


def test_one_actor_per_client_capped_by_cpu_slots():
    assert plan_pool(CPU_BOX, {"num_cpus": 1}, num_clients=10).size == 2
    assert plan_pool(CPU_BOX, {"num_cpus": 1}, num_clients=1).size == 1
    assert plan_pool(CPU_BOX, {"num_cpus": 0.5}, num_clients=10).size == 4
    assert plan_pool(CPU_BOX, {"num_cpus": 0.5}, num_clients=10, num_actors=3).size == 3


def test_fractional_gpus_on_a_gpu_box():
    plan = plan_pool(GPU_BOX, {"num_cpus": 1, "num_gpus": 0.25}, num_clients=20)
    assert plan.size == 8 and plan.gpu_fraction == 0.25  # 2 GPUs / 0.25
    assert plan.actor_options == {"num_cpus": 1, "num_gpus": 0.25}


def test_gpu_request_dropped_without_gpus(caplog):
    plan = plan_pool(CPU_BOX, {"num_cpus": 1, "num_gpus": 0.25}, num_clients=4)
    assert "num_gpus" not in plan.actor_options and plan.gpu_fraction == 0.0
    assert "no GPU" in caplog.text


def test_unplaceable_request_names_the_field():
    with pytest.raises(PlacementError, match="runtime.client_resources"):
        plan_pool(CPU_BOX, {"num_cpus": 4}, num_clients=4)
    with pytest.raises(PlacementError, match="no positive resource"):
        plan_pool(CPU_BOX, {"num_gpus": 1}, num_clients=4)  # GPU dropped, nothing left


def test_custom_resources_are_passed_through():
    plan = plan_pool({"CPU": 4, "trainer": 2}, {"num_cpus": 1, "custom:trainer": 1}, num_clients=4)
    assert plan.size == 2 and plan.actor_options["resources"] == {"trainer": 1}


def test_threads_follow_the_cpu_share():
    assert threads_for({"num_cpus": 2}, None) == 2
    assert threads_for({"num_cpus": 0.5}, None) == 1
    assert threads_for({"num_cpus": 2}, 3) == 3


@pytest.mark.parametrize(
    "address, ok",
    [
        ("127.0.0.1:6379", True),
        ("ray://head.example:10001", True),
        ("auto", True),
        ("[::1]:6379", True),
        ("localhost", False),
        ("http://x:1", False),
        ("1.2.3.4:99999", False),
        ("", False),
    ],
)
def test_address_format(address, ok):
    assert (address_problem(address) is None) == ok


def test_bad_address_and_resources_fail_at_config_time():
    with pytest.raises(ConfigError, match="runtime.address"):
        load_config("smoke", overrides=["runtime.address=not-an-address"])
    with pytest.raises(ConfigError, match="runtime.client_resources"):
        load_config("smoke", overrides=["runtime.client_resources={num_cpus: 0}"])


# --- per-node fit, GPU policy (issue: the cloud path) ---------------------------------------------
TWO_SMALL_GPU_NODES = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]


def test_a_bundle_must_fit_on_one_node_not_in_the_cluster_totals():
    # 4 CPUs and 2 GPUs in all, but no node holds {4 CPU, 1 GPU}: Ray could place none.
    with pytest.raises(PlacementError, match="no node offers"):
        plan_pool(TWO_SMALL_GPU_NODES, {"num_cpus": 4, "num_gpus": 1}, num_clients=4, drop_gpu_without_gpus=False)
    assert capacity(TWO_SMALL_GPU_NODES, {"CPU": 1.0, "GPU": 0.5}) == 4
    assert fits_on_node({"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.5, "GPU": 0.25}) == 1  # CPU-bound on that node
    plan = plan_pool(TWO_SMALL_GPU_NODES, {"num_cpus": 1, "num_gpus": 0.5}, num_clients=10, drop_gpu_without_gpus=False)
    assert (plan.size, plan.wanted, plan.gpu_fraction) == (4, 10, 0.5)


def test_an_empty_head_is_not_an_error_before_waiting():
    # A fresh autoscaling cluster: a 0-CPU head. Nothing fits yet; capacity says so, plan_pool names it.
    assert capacity([{"CPU": 0.0, "memory": 1e9}], {"CPU": 1.0, "GPU": 0.5}) == 0
    with pytest.raises(PlacementError, match="no node offers"):
        plan_pool([{"CPU": 0.0}], {"num_cpus": 1, "num_gpus": 0.5}, num_clients=4, drop_gpu_without_gpus=False)


def test_gpu_policy_refuses_silent_cpu_training_and_cuda_without_a_share():
    assert "every client would train on the CPU" in gpu_problem({"num_cpus": 1}, "auto", cluster_gpus=4)
    assert "actors without a GPU share see no GPU" in gpu_problem({"num_cpus": 1}, "cuda", cluster_gpus=4)
    assert gpu_problem({"num_cpus": 1}, "cpu", cluster_gpus=4) is None  # CPUs on purpose
    assert gpu_problem({"num_cpus": 1, "num_gpus": 0.5}, "auto", cluster_gpus=4) is None
    assert gpu_problem({"num_cpus": 1}, "auto", cluster_gpus=0) is None  # a laptop


def test_actor_request_uses_rays_resource_names():
    assert actor_request({"num_cpus": 2, "num_gpus": 0.5, "custom:trainer": 1, "memory": 0}) == {
        "CPU": 2.0,
        "GPU": 0.5,
        "trainer": 1.0,
    }


# --- GPU shares that do not divide 1, shares above 1 -------------------------------------------------
@pytest.mark.parametrize(
    "gpus, share, actors",
    [
        (2.0, 0.4, 4),  # 2 per GPU (a third 0.4 would straddle two GPUs): not floor(2 / 0.4) = 5
        (2.0, 0.6, 2),  # 1 per GPU: not 3
        (4.0, 0.75, 4),  # not 5
        (2.0, 0.25, 8),
        (2.0, 0.5, 4),
        (4.0, 2.0, 2),  # whole GPUs divide as before
    ],
)
def test_a_fractional_gpu_share_must_fit_on_one_gpu(gpus, share, actors):
    node = {"CPU": 64.0, "GPU": gpus}
    assert fits_on_node(node, {"CPU": 1.0, "GPU": share}) == actors
    plan = plan_pool([node], {"num_cpus": 1, "num_gpus": share}, num_clients=20, drop_gpu_without_gpus=False)
    assert plan.size == actors


def test_a_share_above_one_must_be_whole_gpus():
    with pytest.raises(ConfigError, match=r"runtime.client_resources.num_gpus = 1.5: .* use 1 or 2"):
        load_config("smoke", overrides=["runtime.client_resources={num_cpus: 1, num_gpus: 1.5}"])
    assert load_config("smoke", overrides=["runtime.client_resources={num_cpus: 1, num_gpus: 2}"])


def test_a_sweep_trial_is_checked_against_the_nodes_it_landed_on():
    gpu_node, cpu_node = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}
    problem = trial_gpu_problem({"num_cpus": 1}, "auto", 0.0, [gpu_node])
    assert "landed on nodes with GPUs" in problem and "runtime.client_resources" in problem
    # the sweep dropped the share from the bundles (no GPU alive when it started): still refused there
    assert trial_gpu_problem({"num_cpus": 1, "num_gpus": 0.5}, "auto", 0.0, [gpu_node]) is not None
    assert trial_gpu_problem({"num_cpus": 1, "num_gpus": 0.5}, "auto", 0.5, [gpu_node]) is None
    assert trial_gpu_problem({"num_cpus": 1}, "auto", 0.0, [cpu_node]) is None
    assert trial_gpu_problem({"num_cpus": 1}, "cpu", 0.0, [gpu_node]) is None


def test_cpu_compute_beside_a_gpu_share_is_allowed_with_a_warning(caplog, monkeypatch):
    from sylva_ray.engine import resolve

    monkeypatch.setattr(resolve, "_WARNED", set())  # warned once per process: start afresh
    cfg = load_config(
        "smoke", overrides=["runtime.device=cpu", "runtime.client_resources={num_cpus: 1, num_gpus: 0.25}"]
    )
    assert cfg.runtime.client_resources["num_gpus"] == 0.25
    assert "books that GPU share but computes on the CPU" in caplog.text


# --- the CUDA memory cap of a share ------------------------------------------------------------------
GIB = 1024**3


def test_the_memory_cap_is_the_share_less_the_cuda_context():
    assert cuda_memory_fraction(0.25, 80 * GIB) == pytest.approx(0.25 - 1 / 80)
    assert cuda_memory_fraction(2.0, 80 * GIB) == pytest.approx(1 - 1 / 80)  # whole GPUs: one card per process


@pytest.mark.parametrize("share", [0.01, 0.0125])
def test_a_share_no_larger_than_the_cuda_context_is_refused_with_the_number(share):
    with pytest.raises(GPUMemoryError) as caught:
        cuda_memory_fraction(share, 80 * GIB, "NVIDIA H100 80GB HBM3")
    message = str(caught.value)
    assert f"runtime.client_resources.num_gpus={share:g}" in message
    assert "of a 80.0 GiB NVIDIA H100 80GB HBM3" in message and "num_gpus >= 0.03" in message
