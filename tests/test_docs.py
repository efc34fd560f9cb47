"""The README is the user's manual: its promises are checked here."""

from pathlib import Path

from sylva_ray.base.config import config_field_docs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_config_field_is_in_the_readme():
    missing = [name for name, *_ in config_field_docs() if f"`{name}`" not in README]
    assert missing == []


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(quickstart) == 2
    assert "sylva-ray run" in quickstart[0] and "pytest" in quickstart[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quickstart[1].strip() in ci_lines
