"""Bad inputs, as a careful user and an attacker would give them: each is refused with exit code 2,
an error that names the field or the file, no traceback, nothing written or overwritten, and
before any real work (with ``pytest --perf``, also sooner in-process than a fresh process takes
just to import what a run trains with: ``tests/helpers/refusals.py``). Resume and phase2 on a real
interrupted run: ``tests/e2e/test_resume_refusals.py``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.refusals import refused

ROOT = Path(__file__).resolve().parents[2]


def write_cifar(root: Path, payload: bytes | None = None) -> Path:
    """A tiny CIFAR-10 folder in torchvision's python format; ``payload`` replaces data_batch_1."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, size=(8, 3072), dtype=np.uint8),
                    "labels": rng.integers(0, 10, 8).tolist(),
                },
                handle,
            )
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    if payload is not None:
        (folder / "data_batch_1").write_bytes(payload)
    return folder


class Planted:
    """Unpickling this runs a command that creates a marker file: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


RUN_SET_CASES = [
    ("lora.rank=4096", "lora.rank"),
    ("layer_selection.top_k=99", "layer_selection.top_k"),
    ("train.lr=.inf", "train.lr"),
    ("attack.eps=.nan", "attack.eps"),
    ("loss.proximal_mu=-.inf", "loss.proximal_mu"),
    ("model.name=vit_does_not_exist", "model.name"),
    ("model.kwargs={no_such_argument: 1}", "model.kwargs"),
    ("model.kwargs={embed_dim: 7}", "model.kwargs"),
    ("lora.target_modules=[attn.nothing]", "lora.target_modules"),
    ("lora.target_modules=[proj]", "lora.target_modules"),
    ("data.num_clients=5000", "data.num_clients"),
    ("runtime.client_resources={num_cpus: 512}", "runtime.client_resources"),
    ("runtime.client_resources={gpus: 1}", "runtime.client_resources.gpus"),
    ("runtime.address=not-an-address", "runtime.address"),
    ("runtime.address=127.0.0.1:9", "--address"),
    ("name=/../../escape", "name"),
    ("name=a/b", "name"),
    ("name=..", "name"),
    ("federation.aggregation=nope", "federation.aggregation"),
    ("algorithm.name=nope", "algorithm.name"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("unknown.field=1", "unknown: unknown field"),
    ("model.pretrained=checkpoint", "model.checkpoint"),
    ("data.name=cifar10", "data.root"),
    ("data.partition=nope", "data.partition"),
]


@pytest.mark.parametrize("override, named", RUN_SET_CASES)
def test_run_refuses_a_bad_value(override, named, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    refused(
        ["run", "--preset", "smoke", "--set", override, "--out", str(tmp_path / "run")], named, tmp_path, refusal_budget
    )


def test_algorithm_ablation_of_another_algorithm(tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    refused(
        ["run", "--preset", "smoke", "--set", "algorithm.name=fat", "--set", "algorithm.ablations=[no_phase2]"],
        "algorithm.ablations",
        tmp_path,
        refusal_budget,
    )


@pytest.mark.parametrize(
    "content, named",
    [
        ("just a string", "--config"),
        ("lora: {rank: [unclosed", "--config"),
        ("lora: {rankk: 4}", "lora.rankk"),
    ],
)
def test_run_refuses_a_bad_yaml_file(content, named, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(content)
    refused(["run", "--config", str(tmp_path / "exp.yaml")], named, tmp_path, refusal_budget)


def test_run_refuses_a_missing_yaml_file(tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    refused(["run", "--config", str(tmp_path / "nope.yaml")], "--config", tmp_path, refusal_budget)


def test_run_refuses_a_nonempty_out(tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "summary.json").write_text("{}")
    refused(["run", "--preset", "smoke", "--out", str(tmp_path / "taken")], "--out", tmp_path, refusal_budget)


GARBAGE_SEED = 0
GARBAGE_PAYLOADS = 300  # random bytes reach many unpickler opcodes; each one must end as a named refusal


def test_safe_load_refuses_any_garbage_as_damage(tmp_path):
    """Random bytes raise Overflow/Memory/Key/Unicode errors deep in pickle; all must become UnsafeDataFile."""
    from sylva_ray.method.cifar import UnsafeDataFile, safe_load

    rng = np.random.default_rng(GARBAGE_SEED)
    path = tmp_path / "data_batch_1"
    loaded_values = 0
    for _ in range(GARBAGE_PAYLOADS):
        path.write_bytes(rng.bytes(int(rng.integers(1, 4000))))
        try:
            value = safe_load(path)
        except UnsafeDataFile as exc:
            assert str(path) in str(exc)
        else:  # a few payloads are valid tiny pickles (an int, None): not a dict, refused later by read_split
            loaded_values += 1
            assert not isinstance(value, dict) or not value
    assert loaded_values < GARBAGE_PAYLOADS


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "wrong_content"])
def test_run_refuses_bad_cifar_folders(case, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar"
    named = "data.root"
    if case == "empty":
        root.mkdir()
    elif case == "garbage":
        write_cifar(root, payload=np.random.default_rng(GARBAGE_SEED).bytes(4000))
        named = "data_batch_1"
    elif case == "truncated":
        folder = write_cifar(root)
        (folder / "data_batch_1").write_bytes((folder / "data_batch_1").read_bytes()[:100])
        named = "data_batch_1"
    elif case == "wrong_content":
        write_cifar(root, payload=pickle.dumps({"data": [1, 2, 3], "labels": [0]}))
        named = "data_batch_1"
    refused(
        [
            "run",
            "--preset",
            "smoke",
            "--set",
            "data.name=cifar10",
            "--set",
            f"data.root={root}",
            "--set",
            "data.verify_checksums=false",
            "--set",
            "model.pretrained=none",
            "--set",
            "data.public_fraction=0",
        ],
        named,
        tmp_path,
        refusal_budget,
    )


def test_a_crafted_cifar_pickle_never_runs_its_code(tmp_path, monkeypatch, refusal_budget):
    """The payload would create a marker file when unpickled; checksums off, as for files of one's own."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    root = tmp_path / "cifar"
    write_cifar(root, payload=pickle.dumps({"data": Planted(marker), "labels": [0]}))
    text = refused(
        [
            "run",
            "--preset",
            "smoke",
            "--set",
            "data.name=cifar10",
            "--set",
            f"data.root={root}",
            "--set",
            "data.verify_checksums=false",
            "--set",
            "model.pretrained=none",
            "--set",
            "data.public_fraction=0",
        ],
        "data_batch_1",
        tmp_path,
        refusal_budget,
    )
    assert not marker.exists() and "system" in text
    # the meta file is read the same way
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(Planted(marker)))
    write_ok = root / "cifar-10-batches-py" / "data_batch_1"
    write_ok.write_bytes(pickle.dumps({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 8}))
    refused(
        [
            "run",
            "--preset",
            "smoke",
            "--set",
            "data.name=cifar10",
            "--set",
            f"data.root={root}",
            "--set",
            "data.verify_checksums=false",
            "--set",
            "model.pretrained=none",
            "--set",
            "data.public_fraction=0",
        ],
        "batches.meta",
        tmp_path,
        refusal_budget,
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".safetensors", b"\x00" * 64),
        (".safetensors", b"not a safetensors file at all"),
        (".pt", b"garbage torch file"),
        (".pth", b""),
    ],
)
def test_run_refuses_damaged_weight_files(suffix, content, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(content)
    text = refused(
        ["run", "--preset", "smoke", "--set", "model.pretrained=checkpoint", "--set", f"model.checkpoint={weights}"],
        weights.name,
        tmp_path,
        refusal_budget,
    )
    assert "damaged" in text and "weights_only=False" not in text


def test_a_torch_file_with_code_never_runs_it(tmp_path, monkeypatch, refusal_budget):
    import torch

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": Planted(marker)}, weights)
    refused(
        ["run", "--preset", "smoke", "--set", "model.pretrained=checkpoint", "--set", f"model.checkpoint={weights}"],
        "weights.pt",
        tmp_path,
        refusal_budget,
    )
    assert not marker.exists()


def test_resume_refuses_a_folder_that_is_no_run(tmp_path, refusal_budget):
    (tmp_path / "stranger").mkdir()
    refused(["resume", str(tmp_path / "stranger")], "config.yaml", tmp_path, refusal_budget)
    (tmp_path / "stranger" / "config.yaml").write_text("lora: [")
    refused(["resume", str(tmp_path / "stranger")], "config.yaml", tmp_path, refusal_budget)


# --- compare and the sweep script ---------------------------------------------------------------
@pytest.mark.parametrize(
    "args, named",
    [
        (["--algorithms", "nope"], "--algorithms"),
        (["--algorithms", "sylva,sylva"], "--algorithms"),
        (["--algorithms", "sylva", "--seeds", "0"], "--seeds"),
        (["--algorithms", "sylva,fat", "--reference", "calfat"], "--reference"),
        (["--algorithms", "sylva", "--actors-per-run", "0"], "--actors-per-run"),
        (["--algorithms", "fat-no_phase2"], "fat-no_phase2"),
    ],
)
def test_compare_refuses_bad_arguments(args, named, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    refused(["compare", "--preset", "smoke", "--out", str(tmp_path / "cmp"), *args], named, tmp_path, refusal_budget)


def _sweep_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_eps", ROOT / "sweeps" / "rank_eps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "args, named",
    [
        (["--grid", "lora.rank=0,4"], "lora.rank"),
        (["--grid", "lora.rank"], "--grid"),
        (["--heterogeneity", "mild"], "heterogeneity"),
        (["--set", "attack.eps=2"], "attack.eps"),
    ],
)
def test_sweep_refuses_bad_arguments(args, named, tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    refused(
        ["--smoke-test", "--storage-path", str(tmp_path / "sweeps"), *args],
        named,
        tmp_path,
        refusal_budget,
        entry=_sweep_main(),
    )


def test_sweep_resume_refuses_a_world_writable_storage_folder(tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "shared"
    (storage / "rank_eps").mkdir(parents=True)
    storage.chmod(0o777)
    refused(
        ["--smoke-test", "--storage-path", str(storage), "--resume"],
        "world-writable",
        tmp_path,
        refusal_budget,
        entry=_sweep_main(),
    )


def test_sweep_resume_never_unpickles_a_planted_tuner_state(tmp_path, monkeypatch, refusal_budget):
    """Anyone who can write the storage path could plant Tune's pickled state: without our own
    manifest (plain JSON) naming the same sweep, the folder is never handed to Tune."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    experiment = tmp_path / "sweeps" / "rank_eps"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    refused(
        ["--smoke-test", "--storage-path", str(tmp_path / "sweeps"), "--resume"],
        "sweep.json",
        tmp_path,
        refusal_budget,
        entry=_sweep_main(),
    )
    (experiment / "sweep.json").write_text('{"name": "rank_eps", "grid": {"lora.rank": [99]}}')
    refused(
        ["--smoke-test", "--storage-path", str(tmp_path / "sweeps"), "--resume"],
        "sweep.json",
        tmp_path,
        refusal_budget,
        entry=_sweep_main(),
    )
    assert not marker.exists()


# --- the run directory after kills ----------------------------------------------------------------
def test_a_folder_left_by_a_killed_first_write_is_reusable(tmp_path, monkeypatch):
    """A write killed before its rename leaves only its temporary sibling: --out accepts the folder."""
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.engine.rundir import create_run_dir

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / ".config.yaml.abcd1234.tmp").write_text("name: half writ")
    assert create_run_dir(load_config("smoke"), folder) == folder and not any(folder.iterdir())


def test_an_unfinished_run_is_pointed_to_resume(tmp_path, monkeypatch, refusal_budget):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "started"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: started\n")
    text = refused(["run", "--preset", "smoke", "--out", str(folder)], "--out", tmp_path, refusal_budget)
    assert "sylva-ray resume" in text


def test_results_follow_the_umask(tmp_path):
    from sylva_ray.base.storage import atomic_write_text

    old = os.umask(0o027)
    try:
        written = atomic_write_text(tmp_path / "table.csv", "a,b\n")
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o640


def write_images(root: Path, classes: int = 4, per_class: int = 30, side: int = 20) -> None:
    """Real PNG files, one folder per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")


IMAGEFOLDER_RUN = ["run", "--preset", "smoke", "--set", "data.name=imagefolder", "--set", "model.pretrained=none"]


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_a_damaged_image_is_refused_by_path_before_any_work(damage, tmp_path, monkeypatch, refusal_budget):
    """One bad file among 120: decoded by the checks (not by the launcher, later), named with its path."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "images"
    write_images(root)
    bad = root / "class_2" / "17.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "not_an_image":
        bad.write_text("this is a text file with a .png name\n")
    else:
        bad.write_bytes(b"")
    text = refused(
        [*IMAGEFOLDER_RUN, "--set", f"data.root={root}", "--set", "data.cache_decoded=false"],
        str(bad),
        tmp_path,
        refusal_budget,
    )
    assert "cannot be decoded" in text and "UnidentifiedImageError" not in text


@pytest.mark.parametrize("image_size, limit", [(5000, "object store"), (20000, "free")])
def test_a_pool_that_cannot_fit_is_refused_with_the_numbers_before_decoding(
    image_size, limit, tmp_path, monkeypatch, refusal_budget
):
    """120 files at 5,000 px take 9 GB as uint8: more than Ray's object store on a 24 GiB machine
    (30%); at 20,000 px, 144 GB: more than the machine has. Refused from the file list alone."""
    import psutil

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "images"
    write_images(root)
    pool_gb = 120 * 3 * image_size * image_size / 1e9
    if pool_gb < 0.3 * psutil.virtual_memory().total / 1e9:
        pytest.skip("this machine's object store holds the pool: the refusal cannot be shown here")
    text = refused(
        [*IMAGEFOLDER_RUN, "--set", f"data.root={root}", "--set", f"data.image_size={image_size}"],
        "data.root",
        tmp_path,
        refusal_budget,
    )
    assert f"{pool_gb:.2f} GB as uint8" in text and limit in text and "data.max_samples or data.image_size" in text


def hf_run(root: Path, *settings: str) -> list[str]:
    """``sylva-ray run --preset smoke`` on a Hugging Face dataset at ``root``, plus ``--set`` items."""
    items = ["data.name=hf", f"data.root={root}", "model.pretrained=none", *settings]
    return ["run", "--preset", "smoke", *(arg for item in items for arg in ("--set", item))]


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_damaged_image_in_a_hugging_face_dataset_is_refused_by_file_and_row(
    layout, tmp_path, monkeypatch, refusal_budget
):
    from tests.method.test_data import write_hf

    monkeypatch.chdir(tmp_path)
    write_hf(tmp_path / "ds", layout, damaged_row=7)
    small = ["data.num_clients=2", "data.min_samples_per_client=2", "data.cache_decoded=false"]
    text = refused(hf_run(tmp_path / "ds", *small), "row 7 (image)", tmp_path, refusal_budget)
    assert "cannot be decoded" in text


def test_a_hugging_face_dataset_without_the_named_column_is_refused(tmp_path, monkeypatch, refusal_budget):
    from tests.method.test_data import write_hf

    monkeypatch.chdir(tmp_path)
    write_hf(tmp_path / "ds", "parquet")
    refused(hf_run(tmp_path / "ds", "data.label_column=fine_label"), "no column 'fine_label'", tmp_path, refusal_budget)
