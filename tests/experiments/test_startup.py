"""Start-up and memory (README 'Start-up and memory'): what each process imports, how jobs are
handed out, what an actor keeps, and that ``sylva-ray bench startup`` measures every figure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from sylva_ray.cli import _launch_overrides, build_parser, main
from sylva_ray.distributed.client_host import tensors_of
from sylva_ray.distributed.staging import shareable_state
from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.federation import largest_first
from sylva_ray.engine.resolve import load_config
from sylva_ray.experiments.bench.startup import COLUMNS, VARIANTS
from sylva_ray.method.data import load_source, make_partition

HEAVY = ("torch", "timm", "torchvision", "peft", "transformers", "torchattacks", "sklearn", "pandas", "matplotlib")


def loaded_after(statement: str) -> set[str]:
    """The heavy libraries a fresh interpreter holds after ``statement``."""
    probe = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "statement, allowed",
    [
        # The main process resolves the config without the model libraries.
        ("from sylva_ray.engine.resolve import load_config; load_config('smoke')", set()),
        # The launching process of a Ray run: no torch at all (test_torch_free_launcher runs one).
        ("import sylva_ray.distributed.launcher, sylva_ray.distributed.actors, sylva_ray.cli", {"pandas"}),
        # The driver actor's round loop and tables: torch, but no model library.
        ("import sylva_ray.distributed.executor, sylva_ray.engine.federation", {"torch", "pandas"}),
        # A client actor's host: no tables or plots (timm, peft, torchattacks load when it builds the model).
        ("import sylva_ray.distributed.client_host", {"torch"}),
    ],
)
def test_each_process_imports_only_what_it_uses(statement, allowed):
    assert loaded_after(statement) <= allowed


def test_jobs_go_out_largest_first_ties_by_id():
    sizes = {0: 5, 1: 50, 2: 5, 3: 200, 4: 50}
    assert largest_first([0, 1, 2, 3, 4], sizes) == [3, 1, 4, 0, 2]
    assert largest_first([2, 0], sizes) == [0, 2]


def test_a_worker_keeps_one_clients_split_not_the_whole_pool():
    cfg = load_config("smoke", overrides=["model.pretrained=none", "data.public_fraction=0"])
    source = load_source(cfg.data)
    worker = ClientWorker(cfg, source, make_partition(source, cfg.data, 0))
    first = worker.data(0)
    assert worker.data(0) is first  # the same client again: no second copy
    worker.data(1)
    assert worker.data(0) is not first  # client 1 replaced it: at most one client's copy is held


def test_staged_weights_travel_as_numpy_and_come_back_as_tensors_over_the_same_memory():
    state = {"w": torch.randn(3, 4), "n": torch.arange(5), "half": torch.ones(2, dtype=torch.bfloat16)}
    shared = shareable_state(state)
    assert isinstance(shared["w"], np.ndarray) and isinstance(shared["n"], np.ndarray)
    assert isinstance(shared["half"], torch.Tensor)  # numpy has no bf16
    shared["w"].flags.writeable = False  # as Ray hands it to an actor
    back = tensors_of(shared)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert np.shares_memory(back["w"].numpy(), shared["w"])  # no copy on the way in


def test_dashboard_is_opt_in():
    assert load_config("smoke").runtime.dashboard is False
    args = build_parser().parse_args(["run", "--preset", "smoke", "--dashboard"])
    assert "runtime.dashboard=true" in _launch_overrides(args)
    assert load_config("smoke", overrides=_launch_overrides(args)).runtime.dashboard is True
    quiet = build_parser().parse_args(["run", "--preset", "smoke"])
    assert not any("dashboard" in o for o in _launch_overrides(quiet))


@pytest.mark.slow
def test_bench_startup_runs_fresh_processes_and_reports_every_column(tmp_path, capsys):
    """One repetition of the three variants on a two-round, four-client workload."""
    out = tmp_path / "bench"
    argv = ["bench", "startup", "--repeats", "1", "--out", str(out)]
    argv += ["--set", "federation.rounds=2", "--set", "data.num_clients=4"]
    assert main(argv) == 0
    table = pd.read_csv(out / "bench_startup.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["variant"]) == [v for v, _, _ in VARIANTS]
    assert list(table["actors"]) == [0, 1, 2]
    numbers = table[COLUMNS[2:]]
    assert numbers.notna().all().all() and (numbers > 0).all().all(), table
    assert (table["first_model_s"] < table["wall_s"]).all()
    assert table.loc[0, "first_model_vs_plain"] == 1.0 and table.loc[0, "s_per_round_vs_plain"] == 1.0
    runs = pd.read_csv(out / "bench_startup_runs.csv")
    assert len(runs) == len(VARIANTS)
    processes = pd.read_csv(out / "bench_startup_processes.csv")
    two = processes[processes["variant"] == "ray, 2 actors"].set_index("process")
    assert two.loc["ray::ClientActor", "processes"] == 2 and two.loc["ray::DriverActor", "processes"] == 1
    plain = processes[processes["variant"] == "plain loop"]
    assert list(plain["process"]) == ["main process"]  # the plain loop starts no other process
    assert "first_model_vs_plain" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--set", "federation.rounds=1"]])
def test_bench_startup_refuses_before_writing_anything(tmp_path, argv):
    out = tmp_path / "bench"
    assert main(["bench", "startup", "--out", str(out), *argv]) == 2
    assert not out.exists()
