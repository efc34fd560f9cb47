"""``sylva-ray doctor``: every check in order, exit 1 naming what failed, ``--against`` a run's
recorded environment; the GPU rows in a GPU session (``pytest -m gpu``)."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from sylva_ray.cli import main
from sylva_ray.engine.environment import ENVIRONMENT_FILE, environment_record
from sylva_ray.experiments import doctor

#: The rows of a CPU machine, in the order the doctor checks them.
CPU_CHECKS = ["imports", "torch threads", "weight cache", "disk", "ray", "resources", "gpu", "against"]
HEADER = ("check", "result", "what to do")


def run_doctor(
    capsys: pytest.CaptureFixture[str], *args: str, preset: str = "smoke"
) -> tuple[int, dict[str, tuple[str, str]], list[str]]:
    """``sylva-ray doctor --preset PRESET ARGS``: exit code, {check: (result, what to do)}, check names in order."""
    code = main(["doctor", "--preset", preset, *args])
    lines = capsys.readouterr().out.splitlines()
    result_at, fix_at = (lines[0].index(name) for name in HEADER[1:])
    rows = [(line[:result_at].strip(), line[result_at:fix_at].strip(), line[fix_at:].strip()) for line in lines[1:]]
    return code, {name: (result, fix) for name, result, fix in rows}, [name for name, _, _ in rows]


def last_message(caplog: pytest.LogCaptureFixture) -> str:
    return [r for r in caplog.records if r.name.startswith("sylva_ray")][-1].getMessage()


def test_every_check_in_order_and_a_smoke_run_can_start(ray_cluster, capsys, caplog):
    caplog.set_level(logging.INFO)
    code, rows, order = run_doctor(capsys)
    assert code == 0, rows
    assert order == CPU_CHECKS
    assert all(not result.startswith("FAILED") for result, _ in rows.values()), rows
    assert "torch 2." in rows["imports"][0] and "autoattack" in rows["imports"][0]
    assert rows["ray"][0].startswith("reachable, a local cluster this process started, 1 node(s); token authentication")
    assert rows["resources"][0].startswith("2 of 4 client actors")  # the session cluster's 2 CPUs, 1 each
    assert rows["gpu"][0] == "no GPU visible"
    assert last_message(caplog).startswith("doctor: a run of 'smoke' can start here")


def test_a_request_no_node_can_hold_fails_the_resources_check(ray_cluster, capsys, caplog):
    code, rows, order = run_doctor(capsys, "--set", "runtime.client_resources={num_cpus: 64}")
    assert code == 1 and order == CPU_CHECKS
    result, fix = rows["resources"]
    assert result.startswith("FAILED: 0 of 4 client actors") and "no node offers {'CPU': 64.0}" in fix
    assert last_message(caplog) == "doctor: 1 check(s) failed: resources"


def test_an_address_where_nothing_answers_fails_the_ray_check_in_seconds(capsys, caplog):
    code, rows, order = run_doctor(capsys, "--address", "127.0.0.1:9")
    assert code == 1 and order == CPU_CHECKS
    assert rows["ray"][0] == "FAILED: cannot reach the cluster at 127.0.0.1:9: nothing answers there"
    assert "ray start --head" in rows["ray"][1]
    assert rows["resources"][0] == "skipped: Ray was not reached"  # one cause, one failed row
    assert last_message(caplog) == "doctor: 1 check(s) failed: ray"


def test_the_in_process_engine_needs_no_ray(capsys):
    code, rows, _ = run_doctor(capsys, "--set", "runtime.engine=inprocess")
    assert code == 0
    assert rows["ray"][0].startswith("skipped") and rows["resources"][0].startswith("skipped")


def write_environment(folder, **changes) -> None:
    record = environment_record(device="cpu")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        record[section][key] = value
    folder.mkdir()
    (folder / ENVIRONMENT_FILE).write_text(json.dumps(record))


def test_against_a_run_on_another_cpu_names_the_field(ray_cluster, capsys, tmp_path):
    write_environment(tmp_path / "elsewhere", cpu__model="Imaginary CPU 9000")
    code, rows, _ = run_doctor(capsys, "--against", str(tmp_path / "elsewhere"))
    assert code == 0  # another machine is a reason to compare with care, not a reason a run cannot start
    assert rows["against"][0].startswith("warning: figures may differ: cpu.model 'Imaginary CPU 9000' there, '")

    write_environment(tmp_path / "here")
    assert run_doctor(capsys, "--against", str(tmp_path / "here"))[1]["against"][0] == "figures should repeat here"


def test_against_a_run_without_environment_json_says_so(ray_cluster, capsys, tmp_path):
    code, rows, _ = run_doctor(capsys, "--against", str(tmp_path))
    assert code == 0
    assert (
        rows["against"][0]
        == f"{tmp_path} has no {ENVIRONMENT_FILE} (runs made before it was recorded): nothing to compare"
    )


def test_against_a_missing_folder_is_refused_before_any_check(capsys, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "imports_check", lambda: pytest.fail("a check ran before --against was refused"))
    assert main(["doctor", "--preset", "smoke", "--against", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().out == ""
    assert "--against" in caplog.text and "nowhere" in caplog.text


# --- single checks, without Ray --------------------------------------------------------------------
def test_more_torch_threads_than_cores_is_a_warning(smoke_config, monkeypatch):
    monkeypatch.setattr(doctor, "usable_cores", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    check = doctor.threads_check(smoke_config)
    assert check.ok and check.warning and check.fix == "set OMP_NUM_THREADS=1 for this process"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not doctor.threads_check(smoke_config).warning
    many = dataclasses.replace(smoke_config, runtime=dataclasses.replace(smoke_config.runtime, torch_threads=8))
    assert "runtime.torch_threads" in doctor.threads_check(many).fix


def test_a_cache_that_cannot_be_written_fails(smoke_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = dataclasses.replace(smoke_config, model=dataclasses.replace(smoke_config.model, cache_dir=str(blocker)))
    check = doctor.cache_check(cfg)
    assert not check.ok and "SYLVA_RAY_CACHE" in check.fix


def test_too_little_disk_fails(smoke_config, monkeypatch):
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", float("inf"))
    check = doctor.disk_check(smoke_config)
    assert not check.ok and check.name == "disk" and "GiB free at" in check.result


def test_a_check_that_raises_is_a_failed_row():
    [check] = doctor.guarded("ray", lambda: [1 / 0])
    assert not check.ok and check.name == "ray" and "ZeroDivisionError" in check.result


def test_the_timed_step_is_the_training_loops_step(smoke_config):
    """The GPU row's step, here on the CPU with the smoke model: it trains (weights move), it is timed."""
    from sylva_ray.method.cost import client_model

    cfg = dataclasses.replace(smoke_config, train=dataclasses.replace(smoke_config.train, batch_size=4))
    model = client_model(cfg, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    timing = doctor.timed_train_step(model, cfg, (3, 8, 8), 10, torch.device("cpu"), "fp32")
    assert timing.seconds > 0 and timing.peak_bytes is None
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_a_gpu_actor_that_cannot_be_placed_is_a_timeout_not_a_hang(ray_cluster):
    """The probe behind the ``gpu actor`` row, on a cluster without GPUs: refused in its time limit."""
    from sylva_ray.distributed.probes import probe_fractional_gpu

    with pytest.raises(TimeoutError, match="num_gpus=0.25 was not placed"):
        probe_fractional_gpu(0.25, 8, timeout_s=1.0)


# --- on a machine with CUDA: `pytest -q -m gpu` -------------------------------------------------------
@pytest.mark.gpu
def test_each_gpu_gets_its_rows_and_a_smoke_run_can_start(ray_cluster, capsys):
    # on a GPU cluster a client without a GPU share is refused (the resources row): give it one
    code, rows, order = run_doctor(capsys, "--set", "runtime.client_resources={num_cpus: 1, num_gpus: 0.25}")
    assert code == 0, rows
    devices = range(torch.cuda.device_count())
    gpu_rows = (
        [name for i in devices for name in (f"matmul cuda:{i}", f"bf16/tf32 cuda:{i}")]
        + ["gpu actor"]
        + [f"train step cuda:{i}" for i in devices]
    )
    assert order == CPU_CHECKS[:6] + gpu_rows + CPU_CHECKS[7:]
    assert "TFLOP/s" in rows["matmul cuda:0"][0]
    assert rows["gpu actor"][0].startswith(f"num_gpus={doctor.PROBE_GPU_SHARE:g} got GPU")
    step = rows["train step cuda:0"][0]
    assert "vit_base_patch16_224" in step and "fp32" in step and "GiB (estimate" in step


@pytest.mark.gpu
def test_the_paper_preset_step_is_set_beside_a_client_actors_share(ray_cluster, capsys):
    """``--preset paper`` times the run's own step (no hub weights needed) and checks its peak
    against the cap of a client actor's half card."""
    code, rows, _ = run_doctor(capsys, preset="paper")
    assert code == 0, rows
    assert "batch 32, 10-step attack" in rows["train step cuda:0"][0]
