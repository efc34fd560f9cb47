"""Where results land: absolute run directories, $SYLVA_RAY_HOME, and a Ray job's temporary working dir."""

import pytest

from sylva_ray.base.config import ConfigError
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import (
    HOME_ENV,
    RunDirectoryError,
    create_run_dir,
    load_run_config,
    new_unique_dir,
    prepare_data,
    resolve_result_path,
    results_base,
    write_config,
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_relative_roots_follow_the_current_folder_on_a_laptop(clean_env, monkeypatch):
    work = clean_env / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run_dir = create_run_dir(load_config("smoke"))
    assert run_dir.is_absolute() and run_dir.parent == work / "runs"


def test_sylva_ray_home_takes_relative_roots_and_out(clean_env, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(clean_env / "cluster_home"))
    monkeypatch.chdir(clean_env)
    assert create_run_dir(load_config("smoke")).parent == clean_env / "cluster_home" / "runs"
    assert create_run_dir(load_config("smoke"), "mine") == clean_env / "cluster_home" / "mine"
    assert resolve_result_path(clean_env / "abs") == clean_env / "abs"  # absolute paths are kept


def test_a_ray_jobs_temporary_working_dir_is_not_where_results_go(clean_env, monkeypatch, caplog):
    # `ray job submit --working-dir .` runs the entry point inside Ray's session folder, deleted later
    job_dir = clean_env / "raytmp" / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "pkg"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    assert results_base() == clean_env / "home" / "sylva_ray"
    assert "temporary working directory" in caplog.text
    assert create_run_dir(load_config("smoke")).parent == clean_env / "home" / "sylva_ray" / "runs"


def test_an_existing_run_directory_is_never_written_into(clean_env):
    taken = clean_env / "taken"
    taken.mkdir()
    (taken / "summary.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match="not empty"):
        create_run_dir(load_config("smoke"), taken)


def test_unique_folders_never_reuse_an_existing_one(tmp_path):
    first = new_unique_dir(tmp_path, "phase2-20260101-000000")
    (first / "keep.txt").write_text("earlier results")
    second = new_unique_dir(tmp_path, "phase2-20260101-000000")
    third = new_unique_dir(tmp_path, "phase2-20260101-000000")
    assert [p.name for p in (first, second, third)] == [
        "phase2-20260101-000000",
        "phase2-20260101-000000-2",
        "phase2-20260101-000000-3",
    ]
    assert (first / "keep.txt").read_text() == "earlier results" and not any(second.iterdir())


def test_a_run_keeps_its_partition_and_config_and_reloads_them(tmp_path):
    (tmp_path / "fresh").mkdir()
    cfg = load_config("smoke", overrides=["runtime.seed=3"])
    write_config(tmp_path, cfg)
    source, partition = prepare_data(cfg, tmp_path, resume=False)
    assert load_run_config(tmp_path) == cfg
    again = load_config("smoke", overrides=["runtime.seed=4"])  # another seed would split differently...
    _, reloaded = prepare_data(again, tmp_path, resume=True, source=source)  # ...but a resume keeps the file
    assert (tmp_path / "partition.json").is_file()
    assert reloaded.to_json() == partition.to_json()
    assert prepare_data(again, tmp_path / "fresh", resume=False, source=source)[1].to_json() != partition.to_json()


def test_a_damaged_config_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="config.yaml: not valid YAML"):
        load_run_config(tmp_path)
