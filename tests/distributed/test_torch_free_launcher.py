"""The process that launches a Ray run (``sylva-ray run``) never imports torch, timm or peft: a real
run and a refusal, each in a fresh interpreter where importing them raises. The actors, the driver
and the model-check child are their own processes and import what they need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: Libraries the launching process must not load (torchvision comes with timm).
HEAVY = ("torch", "timm", "peft", "torchattacks", "torchvision")
#: Runs ``sylva-ray`` with ``argv`` in a process where importing any of HEAVY raises ImportError and
#: prints ``blocked: <name>`` with the importing stack, so a swallowed import still shows.
BLOCKED_CLI = f"""
import importlib.abc, sys, traceback
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            traceback.print_stack()
            print("blocked: " + name, file=sys.stderr)
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Blocker())
from sylva_ray.cli import main
code = main(sys.argv[1:])
sys.stderr.write("heavy modules loaded: %s\\n" % sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
sys.exit(code)
"""
#: A short real run: one round, Phase 2 on (its results travel back to the launcher), no AutoAttack.
SHORT_RUN = [
    "federation.rounds=1",
    "evaluation.autoattack=false",
    "evaluation.sanity_checks=false",
    "layer_selection.coalition_steps=1",
    "layer_selection.finetune_steps=1",
]


def blocked_cli(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", BLOCKED_CLI, "--log-level", "INFO", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_a_ray_run_launches_and_finishes_without_torch_in_its_process(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    args = [arg for item in SHORT_RUN for arg in ("--set", item)]
    done = blocked_cli("run", "--preset", "smoke", *args, "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "blocked:" not in done.stderr, done.stderr[-4000:]
    assert "heavy modules loaded: []" in done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected_layers"] and 0.0 < summary["final"]["clean_acc"] <= 1.0
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["torch"]["version"] and environment["device"] == "cpu"  # read from a client actor


@pytest.mark.parametrize(
    "override, named",
    [
        ("lora.target_modules=[no_such_layer]", "lora.target_modules"),  # found by the model-check child
        ("data.num_clients=5000", "data.num_clients"),  # found here, while the child checks the model
    ],
)
def test_a_refusal_without_torch_is_one_line_naming_the_field(override, named, tmp_path):
    out = tmp_path / "refused"
    done = blocked_cli("run", "--preset", "smoke", "--set", override, "--out", str(out))
    assert done.returncode == 2, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and named in done.stderr, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "blocked:" not in done.stderr
    assert not out.exists() and not Path(tmp_path / "runs").exists()


def test_the_model_check_child_names_the_field_and_lists_every_problem():
    """The child's verdict and this process's data problems, in one refusal."""
    from sylva_ray.base.config import ConfigError
    from sylva_ray.engine.preflight import preflight
    from sylva_ray.engine.resolve import load_config

    cfg = load_config("smoke", overrides=["lora.target_modules=[no_such_layer]", "data.num_clients=5000"])
    with pytest.raises(ConfigError) as caught:
        preflight(cfg, torch_free=True)
    assert "lora.target_modules" in str(caught.value) and "data.num_clients" in str(caught.value)


def test_a_failure_while_the_child_checks_ends_the_child(monkeypatch):
    from sylva_ray.engine import preflight as module
    from sylva_ray.engine.resolve import load_config

    started = []

    class Recorded(module.ModelChecks):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while loading the data")

    monkeypatch.setattr(module, "ModelChecks", Recorded)
    monkeypatch.setattr(module, "data_problems", broken)
    with pytest.raises(RuntimeError, match="a bug while loading"):
        module.preflight(load_config("smoke"), torch_free=True)
    [child] = started
    assert child.process.wait(timeout=30) != 0  # killed, not left to finish its checks
