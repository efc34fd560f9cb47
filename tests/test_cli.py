"""End to end through the ``sylva-ray`` entry point, in-process (the Ray engine is the next issue)."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from safetensors.torch import load_file

from sylva_ray.cli import main


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_run_directory_holds_what_the_readme_promises(smoke_run):
    for name in ("config.yaml", "partition.json", "metrics.csv", "rounds.csv", "summary.json", "accuracy.png"):
        assert (smoke_run / name).is_file(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    for key in ("clean_acc", "robust_acc"):
        assert 0 <= summary["final"][key] <= 1 and key in summary["phase1"]
    comm = summary["communication"]
    assert comm["bytes_up"] > 0 and comm["full_model_bytes"] > 30 * comm["adapter_bytes"]
    assert len(summary["per_client"]) == 4
    metrics = pd.read_csv(smoke_run / "metrics.csv")
    assert set(metrics["round"]) == {0, 1} and set(metrics["client"]) == {0, 1, 2, 3}
    models = sorted((smoke_run / "models").glob("client_*.safetensors"))
    assert len(models) == 4 and any("lora_A" in k for k in load_file(str(models[0])))


def test_smoke_run_learns_above_the_majority_floor(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["final"]["clean_acc"] > summary["sanity"]["majority_rate"]
    assert summary["final"]["robust_acc"] <= summary["final"]["clean_acc"]


def test_existing_run_directory_is_never_overwritten(smoke_run, caplog):
    before = {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()}
    assert main(["run", "--preset", "smoke", "--out", str(smoke_run)]) == 2
    assert "not empty" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()} == before


def test_bad_override_fails_before_any_work(tmp_path, caplog):
    out = tmp_path / "never"
    assert main(["run", "--preset", "smoke", "--set", "data.alpha=-2", "--out", str(out)]) == 2
    assert "data.alpha" in caplog.text and not out.exists()


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "smoke", "--set", "lora.rank=16"]) == 0
    assert "rank: 16" in capsys.readouterr().out


def test_the_entry_point_loads_no_heavy_library_until_a_command_needs_it():
    """`sylva-ray --help` must not wait seconds for torch, timm, peft or Ray to import."""
    probe = "import sys, sylva_ray.cli; print(sorted(m for m in ('torch', 'timm', 'peft', 'ray') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_autoattack_bench_on_a_finished_run_repeats_the_protocols_figure(smoke_run, tmp_path):
    """``bench autoattack --run`` attacks the run's final model of its costliest client with the
    protocol's seed: its AutoAttack accuracy is that client's figure in summary.json."""
    out = tmp_path / "bench"
    assert main(["bench", "autoattack", "--run", str(smoke_run), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "bench_autoattack.csv").set_index("stage")
    whole = frame.loc["all of AutoAttack"]
    summary = json.loads((smoke_run / "summary.json").read_text())
    row = next(r for r in summary["per_client"] if r["client"] == int(whole["client"]))
    assert int(whole["images"]) == row["num_autoattack"] == max(r["num_autoattack"] for r in summary["per_client"])
    assert whole["autoattack_acc"] == pytest.approx(row["autoattack_acc"], abs=1e-4)


def test_autoattack_bench_refuses_a_folder_that_is_no_finished_run(tmp_path, caplog):
    out = tmp_path / "bench"
    assert main(["bench", "autoattack", "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "no config.yaml" in caplog.text and not out.exists()
    assert main(["bench", "comm", "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "bench autoattack" in caplog.text and not out.exists()


def test_autoattack_bench_takes_a_phase2_folder_and_refuses_settings_beside_a_run(smoke_run, tmp_path, caplog):
    """A ``sylva-ray phase2`` result folder (its config, and a pointer to the Phase-1 run holding the
    client models) passes the check ``load_client_model`` relies on; ``--set`` beside ``--run`` is refused."""
    from sylva_ray.cli import _finished_run

    phase2_folder = tmp_path / "phase2-x"
    phase2_folder.mkdir()
    (phase2_folder / "config.yaml").write_text((smoke_run / "config.yaml").read_text())
    (phase2_folder / "phase1_run.txt").write_text(str(smoke_run) + "\n")
    assert _finished_run(phase2_folder)[0] == phase2_folder
    (phase2_folder / "phase1_run.txt").write_text(str(tmp_path) + "\n")  # points at no models
    out = tmp_path / "bench"
    assert main(["bench", "autoattack", "--run", str(phase2_folder), "--out", str(out)]) == 2
    assert "no final model of clients [0, 1, 2, 3]" in caplog.text and not out.exists()
    assert main(["bench", "autoattack", "--run", str(smoke_run), "--set", "attack.eps=0.1", "--out", str(out)]) == 2
    assert "leave out --preset, --config and --set" in caplog.text and not out.exists()
