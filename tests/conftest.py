"""Shared fixtures: a private weight cache per session, small configs, tiny models and data.

Ray (when a test needs it) is started once per session by the ``ray_cluster`` fixture with
``ray.init(num_cpus=..., include_dashboard=False)``; token authentication stays at Ray's default.

CPU tests are CPU tests wherever they run. A session is a *GPU session* when it runs the ``gpu``
tests alone (``pytest -m gpu``); every other session hides the GPUs from itself and from every
process it starts (``CUDA_VISIBLE_DEVICES=""``, set before CUDA can start here) and gives its Ray
cluster ``num_gpus=0``. On a GPU host, ``pytest -q`` therefore gives what it gives on a laptop, and
``pytest -q -m gpu`` then runs the ``gpu`` tests in a process of their own, with a Ray cluster
that sees the GPUs (the acceptance run: ``pytest -q && pytest -q -m gpu``).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest
import torch

from sylva_ray.base.config import ExperimentConfig, LoRAConfig, ModelConfig
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.data import ArrayDataset

#: The marker expression that makes a session a GPU session.
GPU_SESSION_MARKERS = "gpu"


def is_gpu_session(config: pytest.Config) -> bool:
    return (config.getoption("markexpr") or "").strip() == GPU_SESSION_MARKERS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--perf",
        action="store_true",
        help="the perf check: also time each refusal of bad input against a fresh process's imports "
        "(wall-time ratios, not part of the default run: a loaded machine can miss them)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Outside a GPU session, hide the GPUs before anything here can start CUDA."""
    if not is_gpu_session(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Embedded pre-training writes to a per-session cache, never the user's ~/.cache."""
    os.environ["SYLVA_RAY_CACHE"] = str(tmp_path_factory.mktemp("sylva_cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smoke_config() -> ExperimentConfig:
    return load_config("smoke")


@pytest.fixture
def blank_model_cfg() -> ModelConfig:
    """The default ViT without any pre-training: for tests that only need shapes and roles."""
    return ModelConfig(pretrained="none")


@pytest.fixture
def lora_cfg() -> LoRAConfig:
    return LoRAConfig(rank=4)


@pytest.fixture
def tiny_dataset() -> ArrayDataset:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 8)
    images = rng.uniform(0, 1, size=(len(labels), 3, 8, 8)).astype(np.float32)
    return ArrayDataset(images, labels.astype(np.int64), 10)  # 4 classes present out of 10


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig: pytest.Config):
    """One real local Ray cluster for the whole session (token authentication at Ray's default):
    without GPUs, except in a GPU session, where Ray finds the host's own."""
    import ray

    gpus = {} if is_gpu_session(pytestconfig) else {"num_gpus": 0}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **gpus)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def refusal_budget(pytestconfig: pytest.Config) -> float | None:
    """With ``--perf``: the seconds a fresh process takes to import what a run trains with, which a
    refusal of bad input must beat (``tests/helpers/refusals.py``); without it, ``None``: no timing."""
    if not pytestconfig.getoption("perf"):
        return None
    from tests.helpers.refusals import import_seconds

    return import_seconds()


#: The folder of end-to-end tests: each runs whole (small) experiments, so each is ``slow``.
E2E_DIR = Path(__file__).resolve().parent / "e2e"


def is_slow(item: pytest.Item) -> bool:
    """A test that starts Ray (it uses ``ray_cluster``, directly or through another fixture:
    ``fixturenames`` is the closure) or lives in ``tests/e2e/``."""
    return "ray_cluster" in getattr(item, "fixturenames", ()) or E2E_DIR in item.path.resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start Ray or run whole experiments are ``slow`` (``pytest -m "not slow"`` for a quick pass);
    ``gpu`` tests run only in a GPU session on a host with CUDA."""
    if not is_gpu_session(config):
        skip = pytest.mark.skip(reason="a gpu test: run `pytest -m gpu` (a session of its own, where CUDA is seen)")
    elif not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
    else:
        skip = None
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
