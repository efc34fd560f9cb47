"""The bench registry: what ``sylva-ray bench`` offers, checked without running a bench or Ray."""

import pytest

from sylva_ray.experiments.bench import BENCHES, Bench, register, run_bench


def test_the_registry_refuses_a_second_bench_of_the_same_name():
    first = BENCHES.get("comm")
    with pytest.raises(ValueError, match="already registered"):
        register(Bench("comm", "another comm", ".comm:bench_comm"))
    assert BENCHES.get("comm") is first and BENCHES.registered().count("comm") == 1


def test_every_bench_has_a_one_line_help_and_a_runner_that_loads():
    assert BENCHES.registered()[0] == "comm"  # the command's default
    for name in BENCHES.registered():
        bench = BENCHES.get(name)
        assert bench.name == name and bench.help.strip() and "\n" not in bench.help, name
        assert callable(bench.load()), name


def test_the_flags_the_command_line_reads_are_the_registrys():
    repeated = {name for name in BENCHES.registered() if BENCHES.get(name).repeated}
    assert repeated == {"startup", "tracking", "transfer"}
    assert {name for name in BENCHES.registered() if BENCHES.get(name).path_free} == {"memory", "clock"}
    assert {name for name in BENCHES.registered() if BENCHES.get(name).takes_run} == {"autoattack"}
    assert {name for name in BENCHES.registered() if BENCHES.get(name).fresh_processes} == {"startup"}


def test_run_bench_leaves_a_bench_of_fresh_processes_to_its_command(tmp_path):
    with pytest.raises(ValueError, match="sylva-ray bench startup"):
        run_bench("startup", None, tmp_path)  # refused before the configuration is read
