"""The documentation is checked like code: the README's promises, the site's build (warnings as
errors), the generated references against the code, and the tutorials' code run as written."""

from __future__ import annotations

import argparse
import html
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sylva_ray.base.config import RuntimeConfig, config_field_docs
from sylva_ray.cli import build_parser
from sylva_ray.cli import main as cli_main
from tests.helpers.cli_capture import run_captured

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
#: A newcomer reads the README in five minutes; the rest lives in docs/.
README_MAX_LINES = 200
#: Seconds the docs build may take before the test gives up on it (not a speed check).
BUILD_LIMIT_S = 600


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(quickstart) == 2
    assert "sylva-ray run" in quickstart[0] and "pytest" in quickstart[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quickstart[1].strip() in ci_lines


def test_the_readme_is_short_and_points_to_the_docs():
    assert len(README.splitlines()) <= README_MAX_LINES
    for target in re.findall(r"\]\(((?:docs|cluster)/[^)#]+)", README):
        assert (ROOT / target).exists(), target
    assert (ROOT / "CITATION.cff").is_file() and (ROOT / "LICENSE").is_file()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as a user builds it: Sphinx, warnings as errors (a broken reference, a page
    missing from the navigation, a config field without a description all fail it)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_LIMIT_S,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def page_text(site: Path, page: str) -> str:
    """A built page's text, tags stripped and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", (site / page).read_text()))


def test_every_configuration_field_is_in_the_generated_reference_with_its_description(site):
    text = " ".join(page_text(site, "reference/configuration.html").split())
    for name, _, _, description in config_field_docs():
        assert name in text, name
        assert " ".join(description.split()) in text, name


def test_a_field_without_a_description_stops_the_reference(monkeypatch):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from sphinx.errors import ExtensionError
        from sylva_reference import configuration_page
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    info = RuntimeConfig.__pydantic_fields__["seed"]
    monkeypatch.setattr(info, "description", "")
    with pytest.raises(ExtensionError, match=r"runtime\.seed"):
        configuration_page()


def test_the_cli_reference_holds_every_command_and_option(site):
    text = page_text(site, "reference/cli.html")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in commands.choices.items():
        assert name in text, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):  # sphinx-argparse leaves -h/--help out
                continue
            for flag in action.option_strings:
                assert flag in text, (name, flag)


def test_the_api_reference_documents_the_public_functions(site):
    text = page_text(site, "reference/api.html")
    for name in ("load_client_model", "load_client_split", "run_sweep", "Algorithm", "Behaviour", "load_plugins"):
        assert name in text, name


def test_the_diagram_and_the_default_runs_plot_are_on_the_pages(site):
    assert (site / "_images" / "dataflow.png").is_file()
    assert "dataflow.png" in (site / "index.html").read_text()
    assert (DOCS / "_static" / "default-run" / "accuracy.png").is_file()


# --- the tutorials' code, as written ------------------------------------------------------------
def test_the_extension_example_registers_and_runs_a_round_of_each(ray_cluster, tmp_path):
    """docs/examples/extend.py through `runtime.plugins`: on the Ray engine (the actors and the
    driver import it themselves) with its aggregation rule and adversary behaviour, and in-process
    with its algorithm."""
    from sylva_ray.distributed.launcher import run
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.method.aggregation import AGGREGATORS
    from sylva_ray.method.algorithms import ALGORITHMS
    from sylva_ray.method.byzantine import BEHAVIOURS

    plugin = "runtime.plugins=[docs/examples/extend.py]"
    one_round = [
        plugin,
        "federation.rounds=1",
        "layer_selection.enabled=false",
        "evaluation.autoattack=false",
        "evaluation.sanity_checks=false",
    ]
    cfg = load_config(
        "smoke",
        overrides=[
            *one_round,
            "federation.aggregation=uniform_mean",
            "adversary.behaviour=reverse_update",
            "adversary.fraction=0.25",
        ],
    )
    assert "fedprox_lora_at" in ALGORITHMS and "uniform_mean" in AGGREGATORS and "reverse_update" in BEHAVIOURS
    (tmp_path / "ray").mkdir()
    summary = run(cfg, tmp_path / "ray", progress=False)
    shares = pd.read_csv(tmp_path / "ray" / "metrics.csv")["agg_weight"].dropna()
    assert len(shares) > 1 and np.allclose(shares, shares.iloc[0])  # uniform: every upload weighs the same
    assert summary["adversary"]["behaviour"] == "reverse_update" and summary["adversary"]["clients"]

    fedprox = load_config("smoke", overrides=[*one_round, "algorithm.name=fedprox_lora_at", "runtime.engine=inprocess"])
    assert fedprox.loss.proximal_mu > 0 and fedprox.federation.aggregation == "fedavg"
    (tmp_path / "inprocess").mkdir()
    summary = run(fedprox, tmp_path / "inprocess", progress=False)
    assert summary["algorithm"]["name"] == "fedprox_lora_at"


def tutorial_commands(page: Path, heading: str = "## Walk-through") -> list[str]:
    """The shell commands of a tutorial's runnable block (the first ```bash block after ``heading``)."""
    section = page.read_text().split(heading, 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_the_reference_lists_the_names_each_registry_holds():
    """A field that names a registered entry lists the registry's names, not names typed by hand."""
    from sylva_ray.base.config import registry_fields
    from sylva_ray.engine.resolve import REGISTRIES

    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from sylva_reference import configuration_page
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    rows = {
        line.split("|")[1].strip(" `"): line for line in configuration_page().splitlines() if line.startswith("| `")
    }
    for dotted, kind in registry_fields():
        assert all(f"`{name}`" in rows[dotted].split("|")[4] for name in REGISTRIES[kind].names()), dotted


def test_the_dataset_and_rule_tutorial_registers_both_and_its_run_resolves(tmp_path, monkeypatch):
    """docs/examples/my_dataset.py and my_rule.py through `runtime.plugins`, with the page's own
    commands: the data file it makes, the run's settings resolved; the data loads and splits, and
    the rule gives the hand-computed answer."""
    import runpy

    import torch

    from sylva_ray.engine.preflight import data_problems
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.method.aggregation import AGGREGATORS, aggregate, is_selecting
    from sylva_ray.method.data import DATASETS, load_source, make_partition
    from sylva_ray.method.robust_aggregation import aggregation_problem
    from sylva_ray.method.update_space import RoundContext

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").symlink_to(DOCS)  # the page's relative paths, from a folder of the test's own
    make, run = tutorial_commands(DOCS / "tutorials" / "dataset-and-rule.md", "## Run it")
    assert shlex.split(make)[0] == "python"
    runpy.run_path(shlex.split(make)[1], run_name="__main__")
    words = shlex.split(run)
    assert words[:2] == ["sylva-ray", "run"]
    settings = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    cfg = load_config(words[words.index("--preset") + 1], overrides=settings)
    assert [Path(p).name for p in cfg.runtime.plugins] == ["my_dataset.py", "my_rule.py"]
    assert cfg.data.name == "npz" and cfg.federation.aggregation == "nearest_to_median"
    assert DATASETS.get("npz").reads_root and is_selecting("nearest_to_median")
    assert not AGGREGATORS.get("nearest_to_median").sample_weighted

    source = load_source(cfg.data)
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert source.private.images.shape == (len(digits.target), 3, 8, 8) and source.private.images.dtype == np.uint8
    assert source.num_classes == 10 and (source.private.labels == digits.target).all()
    assert np.allclose(source.private.pixels()[:, 0].numpy(), digits.images / 16, atol=1 / 16)
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    pooled = np.concatenate([*partition.train, *partition.test])
    assert partition.num_clients == cfg.data.num_clients and sorted(pooled.tolist()) == list(range(len(source.private)))
    assert data_problems(cfg) == []

    # updates (0,0), (1,0), (0,1), (10,10), f = 1: the median is (0.5, 0.5); the three nearest are kept
    reference = {"w": torch.tensor([2.0, -1.0])}
    uploads = [{"w": reference["w"] + torch.tensor(u)} for u in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0])]
    merged, weights = aggregate(
        "nearest_to_median", uploads, [5, 1, 1, 1], cfg.federation, RoundContext(reference, byzantine_f=1)
    )
    assert merged["w"].tolist() == pytest.approx([2.0 + 1 / 3, -1.0 + 1 / 3])
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert aggregation_problem("nearest_to_median", cfg.federation, 2, 2) == (
        "nearest_to_median needs n > f updates (f = 2) and gets n = 2"
    )


def write_image_folder(root: Path, classes: int = 4, per_class: int = 30) -> None:
    """Small real PNGs, one folder per class: a bright bar whose position is the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
            image[2 + 5 * c : 7 + 5 * c, 4:20] = 230
            Image.fromarray(image).save(folder / f"{i}.png")


@pytest.mark.slow
def test_the_own_data_tutorial_runs_as_written(ray_cluster, tmp_path, monkeypatch):
    """Its commands, word for word, on an ImageFolder this test writes where the tutorial says
    `my_images`: the weight file it makes, the config check, the run."""
    write_image_folder(tmp_path / "my_images")
    monkeypatch.chdir(tmp_path)
    commands = tutorial_commands(DOCS / "tutorials" / "own-data.md")
    assert [c.split()[0] for c in commands] == ["python", "sylva-ray", "sylva-ray"]
    for command in commands:
        words = shlex.split(command)
        if words[0] == "python":
            subprocess.run([sys.executable, *words[1:]], check=True, cwd=tmp_path, timeout=BUILD_LIMIT_S)
            continue
        code, errors, _ = run_captured(cli_main, ["--log-level", "WARNING", *words[1:]])
        assert code == 0, errors
    summary = (tmp_path / "runs" / "my-images" / "summary.json").read_text()
    assert '"clean_acc"' in summary and (tmp_path / "my_weights.safetensors").is_file()
