"""Checks that need the model's shape, the data's index or a file's content, run before a run
directory is made or Ray starts: a value that cannot work is one line naming the field, the value
and what is allowed, in about the time of the imports, not a traceback a minute later from an actor.

* the model's shape, a weight file's content and CUDA here: ``engine.model_checks`` (torch), in
  this process for the in-process engine, in a child process meanwhile for a Ray run (whose
  launching process holds no torch);
* the data is loaded as the run will load it, every image decoded (CIFAR through the safe reader,
  an ImageFolder sized from its file list first, then decoded in parallel), and split as the run
  will split it; the run then takes the loaded data from this process instead of reading it again;
* a one-machine cluster's CPUs against ``runtime.client_resources`` (``local_cpus``; the caller
  knows whether the run stays on this machine: ``distributed.connect.check_before_start``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Optional

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.method.cifar import UnsafeDataFile
from sylva_ray.method.data import DATASETS, PartitionError, load_source, make_partition
from sylva_ray.method.image_folder import DamagedImage

#: Characters of a failed model-check process's stderr kept in the error (its traceback's end).
CHILD_ERROR_TAIL = 3000


def preflight(
    cfg: ExperimentConfig,
    *,
    data: bool = True,
    local_cpus: Optional[int] = None,
    cuda_here: bool = False,
    torch_free: bool = False,
) -> None:
    """Every check; raises ``ConfigError`` listing all problems found. ``local_cpus``: the CPUs of
    the one machine the run's Ray cluster will have (None: not a one-machine run); ``cuda_here``:
    ``runtime.device=cuda`` needs CUDA on this machine; ``torch_free``: this process must not load
    torch (it launches a Ray run), so the model-side checks run in a child meanwhile."""
    child = ModelChecks(cfg, cuda_here) if torch_free else None
    try:
        data_side = data_problems(cfg, local_memory=local_cpus is not None) if data else []
    except BaseException:  # a bug or Ctrl-C here: the child's verdict is moot
        if child is not None:
            child.process.kill()
        raise
    if child is not None:
        problems = child.problems()
    else:
        from sylva_ray.engine.model_checks import model_side_problems

        problems = model_side_problems(cfg, cuda_here)
    problems += data_side + resource_problems(cfg, local_cpus)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


class ModelChecks:
    """``engine.model_checks`` in a child process, started at once: it imports torch and timm and
    builds the meta model while this process loads and splits the data, and is gone before any
    client actor starts."""

    def __init__(self, cfg: ExperimentConfig, cuda_here: bool) -> None:
        request = json.dumps({"config": cfg.to_dict(), "cuda_here": cuda_here})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sylva_ray.engine.model_checks", request],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def problems(self) -> list[str]:
        """The child's verdict (waits for it); a child that failed is a bug, raised with its traceback."""
        out, err = self.process.communicate()
        if self.process.returncode != 0:
            raise RuntimeError(
                f"the model checks' process (python -m sylva_ray.engine.model_checks) failed with exit status "
                f"{self.process.returncode}:\n{err[-CHILD_ERROR_TAIL:]}"
            )
        return list(json.loads(out))


def data_problems(cfg: ExperimentConfig, local_memory: bool = False) -> list[str]:
    """Load and split the data as the run will: every image decoded (a damaged file is named), the
    partition made; the loaded source stays in this process for the run (``data.load_source``).

    An image folder is first sized from its file list: a pool that cannot fit is refused before a
    single file is decoded. ``local_memory``: the run's Ray cluster is this machine's, so its
    object store (where the pool is put once) is checked too."""
    problems = pool_problems(cfg, local_memory)
    if problems:
        return problems
    try:
        source = load_source(cfg.data)
        make_partition(source, cfg.data, cfg.runtime.seed, describe=False)
    except (FileNotFoundError, UnsafeDataFile, PartitionError, DamagedImage) as exc:
        return [str(exc)]
    return []


#: Ray's object store takes this share of a machine's memory by default
#: (``ray._private.ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``).
RAY_OBJECT_STORE_FRACTION = 0.3
BYTES_PER_GB = 1e9


def pool_memory_problems(what: str, pool_bytes: int, local_memory: bool) -> list[str]:
    """The decoded pool against this machine: held once in this process and, on a local run, put
    once in Ray's object store (the actors read it from there without copies)."""
    import psutil

    memory = psutil.virtual_memory()
    store = RAY_OBJECT_STORE_FRACTION * memory.total
    needed = pool_bytes * (2 if local_memory else 1)  # this process's copy (+ the store's, on this machine)
    fix = "lower data.max_samples or data.image_size, or run on a node with more memory"
    problems = []
    if needed > memory.available:
        problems.append(
            f"{what}: the decoded pool takes {pool_bytes / BYTES_PER_GB:.2f} GB as uint8"
            + (", held here and again in Ray's object store" if local_memory else "")
            + f", more than the {memory.available / BYTES_PER_GB:.2f} GB this machine has free; {fix}"
        )
    elif local_memory and pool_bytes > store:
        problems.append(
            f"{what}: the decoded pool takes {pool_bytes / BYTES_PER_GB:.2f} GB as uint8, more than Ray's object "
            f"store on this machine ({RAY_OBJECT_STORE_FRACTION:.0%} of {memory.total / BYTES_PER_GB:.1f} GB = "
            f"{store / BYTES_PER_GB:.2f} GB); {fix}"
        )
    return problems


def pool_problems(cfg: ExperimentConfig, local_memory: bool = False) -> list[str]:
    """The pool a dataset that sizes itself from an index (``DatasetSpec.pool_size``: its files,
    columns and rows) will decode, against the memory it will take, before any image is decoded."""
    spec = DATASETS.find(cfg.data.name)
    if spec is None or spec.pool_size is None:
        return []
    pool = spec.pool_size(cfg.data)
    if isinstance(pool, str):
        return [pool]
    what = f"data.root = {cfg.data.root!r} ({pool.images:,} images at data.image_size={cfg.data.image_size})"
    return pool_memory_problems(what, pool.decoded_bytes, local_memory)


def resource_problems(cfg: ExperimentConfig, local_cpus: Optional[int]) -> list[str]:
    """A run that starts its own one-machine Ray cluster gets this machine's CPUs, no more."""
    if local_cpus is None:
        return []
    cpus = local_cpus
    need = cfg.runtime.client_resources.get("num_cpus", 0)
    if need > cpus:
        return [
            f"runtime.client_resources.num_cpus = {need:g}: this machine has {cpus} CPUs, so no client actor could "
            "start; "
            f"ask for at most {cpus}, or join a larger cluster with --address"
        ]
    return []
