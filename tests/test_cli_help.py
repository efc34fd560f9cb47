"""``sylva-ray --help`` and each command's help: written for users, the benches' from their registry."""

import argparse
import re

import pytest

from sylva_ray.cli import build_parser, main
from sylva_ray.experiments.bench import BENCHES


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_top_level_help_describes_the_tool_and_shows_examples(capsys):
    text = help_text(capsys)
    description, _, rest = text.partition("positional arguments")
    assert "federated adversarial fine-tuning" in description and "Phase 2" in description
    examples = rest[rest.index("examples:") :]
    for command in ("run", "resume", "phase2", "config", "compare", "study", "bench", "doctor"):
        assert re.search(rf"^  - sylva-ray {command}\b", examples, re.MULTILINE), command
    assert "``" not in text and "Nothing else lives here" not in text and "->" not in text


def test_every_command_has_a_help_line_and_a_description(capsys):
    text = help_text(capsys)
    for name, parser in commands().items():
        assert re.search(rf"^    {name} +\S", text, re.MULTILINE), name  # its line in sylva-ray --help
        assert parser.description and "``" not in parser.description, name
        assert parser.description.splitlines()[0] in help_text(capsys, name), name


def test_the_bench_help_lists_every_registered_bench_with_its_help(capsys):
    text = help_text(capsys, "bench")
    for name in BENCHES.registered():
        bench_help = BENCHES.get(name).help
        assert bench_help.strip(), name
        assert re.search(rf"^  - {name} +{re.escape(bench_help)}$", text, re.MULTILINE), name


def test_the_bench_command_lines_parse_as_before():
    parser = build_parser()
    assert parser.parse_args(["bench"]).which == "comm"
    args = parser.parse_args(["bench", "startup", "--repeats", "3", "--set", "a=b", "--out", "o", "--preset", "smoke"])
    assert (args.which, args.repeats, args.overrides, args.out, args.preset) == ("startup", 3, ["a=b"], "o", "smoke")
    assert parser.parse_args(["bench", "autoattack", "--run", "r"]).run == "r"
    assert [c for c in commands()["bench"]._actions if c.dest == "which"][0].choices == BENCHES.registered()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "no-such-bench"])
