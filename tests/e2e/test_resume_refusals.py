"""Resume and phase2 refusals on a real (interrupted) run on the session's Ray cluster: each refusal
is one line naming the field or file, exit code 2, nothing written (the other bad inputs:
``tests/engine/test_bad_inputs.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sylva_ray.cli import main
from tests.helpers.cli_capture import run_captured
from tests.helpers.refusals import refused, snapshot


@pytest.fixture(scope="module")
def interrupted_run(ray_cluster, tmp_path_factory):
    """A smoke run stopped after its first round, as an interruption leaves it."""
    from sylva_ray.distributed.launcher import run
    from sylva_ray.engine.resolve import load_config

    run_dir = tmp_path_factory.mktemp("bad_inputs") / "interrupted"
    run_dir.mkdir()
    cfg = load_config(
        "smoke",
        overrides=[
            "federation.rounds=2",
            "layer_selection.enabled=false",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
        ],
    )
    assert run(cfg, run_dir, stop_after=1, progress=False) is None
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


@pytest.mark.parametrize(
    "field, value",
    [("lora", {"rank": 16}), ("attack", {"eps": 0.2}), ("data", {"alpha": 0.9}), ("runtime", {"seed": 7})],
)
def test_resume_refuses_a_hand_edited_config(field, value, interrupted_run, tmp_path, refusal_budget):
    run_dir = _copy(interrupted_run, tmp_path)
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw[field].update(value)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    key = f"{field}.{next(iter(value))}"
    text = refused(["resume", str(run_dir)], key, tmp_path, refusal_budget)
    assert "differ" in text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_resume_refuses_a_damaged_checkpoint(damage, interrupted_run, tmp_path, refusal_budget):
    run_dir = _copy(interrupted_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": data[: len(data) // 3], "garbage": os.urandom(2048), "empty": b""}[damage])
    text = refused(["resume", str(run_dir)], "checkpoint.pt", tmp_path, refusal_budget)
    assert "damaged" in text and "weights_only=False" not in text


def test_resume_refuses_a_garbage_partition(interrupted_run, tmp_path, refusal_budget):
    run_dir = _copy(interrupted_run, tmp_path)
    (run_dir / "partition.json").write_text("{not json")
    refused(["resume", str(run_dir)], "partition.json", tmp_path, refusal_budget)


def test_phase2_refuses_an_unfinished_run_and_bad_values(interrupted_run, tmp_path, refusal_budget):
    run_dir = _copy(interrupted_run, tmp_path)
    refused(["phase2", str(run_dir)], "Phase 1 has not finished", tmp_path, refusal_budget)
    refused(
        ["phase2", str(run_dir), "--set", "layer_selection.top_k=99"], "layer_selection.top_k", tmp_path, refusal_budget
    )
    refused(["phase2", str(run_dir), "--set", "lora.rank=.inf"], "lora.rank", tmp_path, refusal_budget)


def test_a_finished_runs_damaged_tables_are_rewritten_from_its_checkpoint(interrupted_run, tmp_path):
    """Resume of a finished run rewrites metrics.csv/rounds.csv that no longer match its checkpoint."""
    import pandas as pd

    from sylva_ray.distributed.launcher import resume

    run_dir = _copy(interrupted_run, tmp_path)
    assert resume(run_dir, progress=False)["final"]  # finishes round 2
    good = (run_dir / "metrics.csv").read_text()
    (run_dir / "metrics.csv").write_text("garbage,\n1")
    (run_dir / "rounds.csv").write_bytes(b"\xff\xfe")
    resume(run_dir, progress=False)
    assert (run_dir / "metrics.csv").read_text() == good
    assert len(pd.read_csv(run_dir / "rounds.csv")) == 2


def test_resume_refuses_a_tampered_partition(interrupted_run, tmp_path, refusal_budget):
    import json

    run_dir = _copy(interrupted_run, tmp_path)
    partition = json.loads((run_dir / "partition.json").read_text())
    first = next(iter(k for k in partition if isinstance(partition[k], list) and partition[k]))
    partition[first] = list(reversed(partition[first]))  # still valid JSON, other contents
    (run_dir / "partition.json").write_text(json.dumps(partition))
    refused(["resume", str(run_dir)], "inputs.partition_sha256", tmp_path, refusal_budget)


@pytest.mark.slow
def test_resume_refuses_other_pretrained_weights(ray_cluster, tmp_path, monkeypatch):
    """The weight file changed between the interruption and the resume: the driver refuses to mix them."""
    from safetensors.torch import save_file

    from sylva_ray.base.config import ModelConfig
    from sylva_ray.distributed.launcher import run
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.method.models import seeded_create
    from sylva_ray.method.pretrained import create_backbone

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_backbone(ModelConfig(pretrained="none"), 10).state_dict().items()},
        str(weights),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(
        "smoke",
        overrides=[
            "federation.rounds=2",
            "layer_selection.enabled=false",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
            "model.pretrained=checkpoint",
            f"model.checkpoint={weights}",
        ],
    )
    assert run(cfg, run_dir, stop_after=1, progress=False) is None
    other = seeded_create("vit_pico_patch4_16", 10, {}, seed=123)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    before = snapshot(run_dir)
    code, text, _ = run_captured(main, ["resume", str(run_dir)])
    assert code == 2 and "inputs.weights_sha256" in text
    assert snapshot(run_dir) == before
