"""``sylva-ray doctor``: can a run of this configuration start here, and if not, what to change.

One table, one row per check, in the order a run meets them: the libraries import, torch's
threads against the usable cores, the weight cache, the disk under the results folder, the Ray
cluster (reachable, token authentication), the client actors' resources against its nodes, then
on each visible GPU a matmul, its bf16/TF32 support, a fractional-GPU Ray actor and one
paper-shape training step, and last, with ``--against RUN``, whether RUN's figures should repeat
here. Exit code 0 when nothing failed (a warning does not fail it), 1 otherwise, with the failed
checks named in the last log line.

Why a command of its own: a run meets these problems one at a time, minutes apart (a cache it
cannot write after the data loaded, actors that never fit after the cluster started); the doctor
meets them all in seconds, before anything is written.

Every check is a small function returning a ``Check``; a check that raises is a failed row, never
a crash (the doctor runs where things are broken). Ray's own API is reached through
``sylva_ray.distributed`` (``connect``, ``capacity``, ``probes``), imported inside the checks so
that a missing library is the ``imports`` row, not an ImportError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import pandas as pd
import torch

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.base.storage import default_cache_dir
from sylva_ray.engine.environment import ENVIRONMENT_FILE

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: (label, module to import, distribution whose version is reported): what a run imports somewhere.
IMPORTS = (
    ("torch", "torch", "torch"),
    ("ray", "ray", "ray"),
    ("timm", "timm", "timm"),
    ("peft", "peft", "peft"),
    ("torchattacks", "torchattacks", "torchattacks"),
    ("autoattack", "pyautoattack", "pyautoattack"),
    ("shapiq", "shapiq", "shapiq"),
    ("byzfl", "byzfl", "byzfl"),
)
#: Below this much free space under the results folder a run may die writing its checkpoints.
MIN_FREE_GIB = 1.0
BYTES_PER_MB = 2**20
BYTES_PER_GIB = 2**30
#: Side of the square fp32 matmul timed on each GPU, and how many are timed after one warm-up.
MATMUL_SIZE = 4096
MATMUL_REPEATS = 10
FLOPS_PER_TFLOP = 1e12
MS_PER_S = 1e3
#: Characters of an exception's text kept in a row (a CUDA error can run to pages).
ERROR_CHARS = 200
#: A matmul of two n x n matrices: n^3 multiply-adds, 2 FLOPs each.
FLOPS_PER_MULTIPLY_ADD = 2
#: The GPU share the doctor's Ray actor asks for: the smallest share the configurations use.
PROBE_GPU_SHARE = 0.25
#: Seconds the fractional-GPU actor may take to be placed, start CUDA and answer.
PROBE_TIMEOUT_S = 120.0
#: Compute capability from which a card has bf16 and TF32 tensor cores (Ampere).
TENSOR_CORE_CAPABILITY = (8, 0)
#: The training arithmetics timed at paper shape, as ``runtime.precision`` names them.
STEP_PRECISIONS = ("fp32", "tf32", "bf16")
#: TF32 changes how a matmul rounds, not what is stored: its memory estimate is fp32's.
SAME_MEMORY_AS = {"tf32": "fp32"}
#: The preset whose model (ViT-B/16 at 224 px) and inputs the GPU training step has.
PAPER_PRESET = "paper"
#: The paper's dataset: the step's inputs when the configuration's own are unknown without reading them.
PAPER_DATASET = "cifar10"
#: Ray resource name of a GPU in ``ray.nodes()``.
GPU_RESOURCE = "GPU"
#: Shown where a check has nothing for the user to do.
NOTHING_TO_DO = ""


@dataclass(frozen=True)
class Check:
    """One row: ``ok`` False fails the doctor (exit 1); ``warning`` marks a passing row that needs a look."""

    name: str
    ok: bool
    result: str
    fix: str = NOTHING_TO_DO
    warning: bool = False


def failed(name: str, result: str, fix: str) -> Check:
    """A check that stops a run from starting (exit code 1)."""
    return Check(name, False, result, fix)


def warned(name: str, result: str, fix: str) -> Check:
    """A check a run survives, but worse than it could (shown as a warning; exit code unchanged)."""
    return Check(name, True, result, fix, warning=True)


# --- this process --------------------------------------------------------------------------------
def imports_check() -> Check:
    """Every library a run imports somewhere (the driver, an actor, an evaluation) imports here: a
    broken install otherwise surfaces minutes into a run, in an actor's log."""
    found, broken = [], []
    for label, module, distribution in IMPORTS:
        try:
            importlib.import_module(module)
            found.append(f"{label} {importlib.metadata.version(distribution)}")
        except Exception as exc:  # ImportError, or whatever a half-installed package raises at import
            broken.append(f"{label} ({type(exc).__name__}: {exc})")
    if broken:
        return failed(
            "imports",
            "cannot import " + "; ".join(broken),
            "reinstall the project with its dependencies: pip install -e . (in the environment that runs sylva-ray)",
        )
    return Check("imports", True, ", ".join(found))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a batch job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_check(cfg: ExperimentConfig) -> Check:
    """torch's intra-op threads against the usable cores: more threads than cores time-slice one
    another and a step gets slower, not faster (a warning: the run still starts). A client actor's
    threads default to its ``num_cpus``, which Ray only places where the CPUs are; only an explicit
    ``runtime.torch_threads`` can ask for more."""
    from sylva_ray.distributed.placement import threads_for

    threads, cores = torch.get_num_threads(), usable_cores()
    actor = threads_for(cfg.runtime.client_resources, cfg.runtime.torch_threads)
    result = f"{threads} torch threads here, {actor} per client actor; {cores} usable cores"
    fixes = []
    if threads > cores:
        fixes.append(f"set OMP_NUM_THREADS={cores} for this process")
    if cfg.runtime.torch_threads is not None and cfg.runtime.torch_threads > cores:
        fixes.append(f"set runtime.torch_threads to at most {cores} (or leave it unset: the actor's num_cpus)")
    if fixes:
        return warned("torch threads", result, "; ".join(fixes))
    return Check("torch threads", True, result)


def cache_folder(cfg: ExperimentConfig) -> Path:
    return Path(cfg.model.cache_dir).expanduser() if cfg.model.cache_dir else default_cache_dir()


def cache_check(cfg: ExperimentConfig) -> Check:
    """The weight cache exists (or is created) and takes a file: embedded pre-training writes its
    weights there once and every later run reads them back."""
    folder = cache_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-", delete=True) as probe:
            probe.write(b"sylva-ray doctor")
            probe.flush()
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    except OSError as exc:
        return failed(
            "weight cache",
            f"{folder} is not writable ({exc.strerror or exc})",
            "set SYLVA_RAY_CACHE (or model.cache_dir) to a folder this user can write",
        )
    return Check("weight cache", True, f"{folder} writable, {size / BYTES_PER_MB:.1f} MB")


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (the results folder may not exist before a first run)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(cfg: ExperimentConfig) -> Check:
    """Free space where the run directories go (``output.root`` under the results folder): a run
    writes checkpoints every round and a full disk kills it mid-way."""
    from sylva_ray.engine.rundir import resolve_result_path

    root = resolve_result_path(cfg.output.root)
    existing = nearest_existing(root)
    free = shutil.disk_usage(existing).free / BYTES_PER_GIB
    result = f"{free:.1f} GiB free at {existing} (output.root: {root})"
    if free < MIN_FREE_GIB:
        return failed(
            "disk",
            result,
            f"free at least {MIN_FREE_GIB:g} GiB there, or set SYLVA_RAY_HOME / output.root to a larger disk",
        )
    return Check("disk", True, result)


# --- the Ray cluster -----------------------------------------------------------------------------
@dataclass
class Cluster:
    """What the Ray checks learned, for the checks after them (None: Ray was not reached)."""

    nodes: Optional[list[dict[str, float]]] = None
    can_grow: bool = False

    @property
    def gpus(self) -> float:
        return float(sum(node.get(GPU_RESOURCE, 0.0) for node in self.nodes or []))


def ray_check(cfg: ExperimentConfig, address: Optional[str], cluster: Cluster) -> Check:
    """The cluster answers (joined at ``address``, or started here), and whether it asks for Ray's
    token authentication: without it anyone who reaches its ports can run code on every node."""
    if cfg.runtime.engine == "inprocess":
        return Check("ray", True, "skipped: runtime.engine=inprocess runs without Ray")
    from sylva_ray.distributed.capacity import alive_nodes
    from sylva_ray.distributed.connect import NO_HOST_ADDRESSES, cluster_can_grow, connect, probe_address
    from sylva_ray.distributed.probes import AUTH_MODE_ENV, authentication_mode

    target = f"the cluster at {address}" if address else "Ray (starting a local cluster)"
    try:
        if address not in NO_HOST_ADDRESSES:
            probe_address(address)  # type: ignore[arg-type]
    except ConnectionError as exc:  # its message says what to do
        return failed("ray", f"cannot reach {target}: nothing answers there", str(exc))
    try:
        connect(address, dashboard=False)
        cluster.nodes, cluster.can_grow = alive_nodes(), cluster_can_grow()
    except Exception as exc:  # a refusal (authentication), a version mismatch, a head that is not Ray's
        if address and authentication_mode() != "token":
            fix = (
                f"something answers there but refused this driver: a cluster with token authentication needs "
                f"{AUTH_MODE_ENV}=token here and its token (`ray get-auth-token` on the head prints it; put it in "
                "~/.ray/auth_token)"
            )
        else:
            fix = "check that the address is a Ray head of the same Ray version (`ray status` there)"
        return failed("ray", f"cannot reach {target}: {type(exc).__name__}: {exc}", fix)
    mode = authentication_mode()
    setting = f"{AUTH_MODE_ENV}={os.environ.get(AUTH_MODE_ENV, 'unset')}"
    nodes = f"{len(cluster.nodes)} node(s)"
    if not cluster.can_grow:  # its head runs in this process, in this process's mode
        result = (
            f"reachable, a local cluster this process started, {nodes}; token authentication {_on(mode)} ({setting})"
        )
        if mode != "token":
            return warned("ray", result, f"unset {AUTH_MODE_ENV} (Ray then turns token authentication on by default)")
        return Check("ray", True, result)
    where = f"reachable, joined at {address or os.environ.get('RAY_ADDRESS') or 'auto'}, {nodes}"
    if mode != "token":  # a cluster with token authentication refuses a driver without the token
        return warned(
            "ray",
            f"{where}; token authentication off: the cluster accepted this driver without a token ({setting})",
            f"restart the cluster with {AUTH_MODE_ENV}=token on every node (`ray get-auth-token --generate` makes "
            "the token) and give its drivers the token",
        )
    return Check(
        "ray",
        True,
        f"{where}; this driver sends Ray's token ({setting}): the cluster requires it if it was started with "
        f"{AUTH_MODE_ENV}=token",
    )


def _on(mode: str) -> str:
    return "on" if mode == "token" else "off"


def resources_check(cfg: ExperimentConfig, cluster: Cluster) -> Check:
    """How many client actors of ``runtime.client_resources`` the nodes hold, node by node, as the
    run plans its pool (``placement.plan_pool``): none fits, no run."""
    if cfg.runtime.engine == "inprocess":
        return Check("resources", True, "skipped: runtime.engine=inprocess runs the clients in this process")
    if cluster.nodes is None:
        return Check("resources", True, "skipped: Ray was not reached")
    from sylva_ray.distributed.placement import (
        actor_request,
        capacity,
        fits_on_node,
        gpu_problem,
        shortfall,
        wanted_actors,
    )

    request = dict(cfg.runtime.client_resources)
    note = ""
    if not cluster.can_grow and request.get("num_gpus", 0) > 0 and cluster.gpus <= 0:
        request.pop("num_gpus")  # as plan_pool does on a cluster that cannot grow
        note = " (num_gpus dropped: this cluster has no GPU, the clients train on the CPU)"
    bundle = actor_request(request)
    if not bundle:
        return failed(
            "resources",
            f"runtime.client_resources={dict(cfg.runtime.client_resources)} asks for nothing to place actors by",
            "set runtime.client_resources.num_cpus >= 0.5",
        )
    wanted = wanted_actors(cfg.data.num_clients, cfg.runtime.num_actors)
    fits = capacity(cluster.nodes, bundle)
    per_node = [fits_on_node(node, bundle) for node in cluster.nodes]
    result = f"{min(fits, wanted)} of {wanted} client actors of {bundle} fit (per node: {per_node}){note}"
    problem = gpu_problem(cfg.runtime.client_resources, cfg.runtime.device, cluster.gpus)
    if problem:
        return failed("resources", result, problem)
    if fits < 1:
        why = shortfall(cluster.nodes, bundle)
        if cluster.can_grow:
            return warned(
                "resources",
                f"{result}; the cluster can grow: a run waits up to runtime.resource_timeout_s",
                f"{why}: check that its node types can hold {bundle}",
            )
        return failed("resources", result, f"{why}: lower runtime.client_resources")
    return Check("resources", True, result)


# --- each GPU ------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block, whatever they were before."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_check(index: int) -> Check:
    """A 4096 x 4096 fp32 matmul (TF32 off), timed: a card far below its datasheet is throttled,
    shared or on a slow link, and every step will be as slow."""
    name = f"matmul cuda:{index}"
    device = torch.device("cuda", index)
    try:
        left, right = (torch.rand(MATMUL_SIZE, MATMUL_SIZE, device=device) for _ in range(2))
        with tf32_matmuls(False):
            left @ right  # warm-up: cuBLAS's handle and kernel choice
            synchronize(device)
            started = time.perf_counter()
            for _ in range(MATMUL_REPEATS):
                left @ right
            synchronize(device)
        seconds = (time.perf_counter() - started) / MATMUL_REPEATS
    except RuntimeError as exc:
        return failed(
            name, f"a {MATMUL_SIZE}² matmul failed: {exc}", "check the driver and that no process holds the card"
        )
    tflops = FLOPS_PER_MULTIPLY_ADD * MATMUL_SIZE**3 / seconds / FLOPS_PER_TFLOP
    card = torch.cuda.get_device_name(index)
    return Check(name, True, f"{card}: {MATMUL_SIZE}² fp32 matmul {seconds * MS_PER_S:.2f} ms, {tflops:.1f} TFLOP/s")


def precision_check(index: int, cfg: ExperimentConfig) -> Check:
    """Whether the card has bf16 and TF32 tensor cores: ``runtime.precision=bf16`` needs the first,
    ``tf32`` is a no-op (fp32 speed) without the second."""
    name = f"bf16/tf32 cuda:{index}"
    capability = torch.cuda.get_device_capability(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    tf32 = capability >= TENSOR_CORE_CAPABILITY
    major, minor = capability
    result = f"bf16 {'yes' if bf16 else 'no'}, TF32 {'yes' if tf32 else 'no'} (compute capability {major}.{minor})"
    if cfg.runtime.precision == "bf16" and not bf16:
        return failed(name, result, "this card has no bf16: use runtime.precision=fp32")
    if cfg.runtime.precision == "tf32" and not tf32:
        return warned(name, result, "this card has no TF32: runtime.precision=tf32 computes in fp32 here")
    return Check(name, True, result)


def gpu_actor_check(cluster: Cluster) -> Check:
    """A Ray actor holding a quarter GPU gets a CUDA device, allocates on it and computes: Ray's
    GPU share is bookkeeping, and a node whose workers cannot see their card fails only here."""
    name = "gpu actor"
    if cluster.nodes is None:
        return Check(name, True, "skipped: Ray was not reached")
    if cluster.gpus <= 0:
        return warned(
            name,
            "skipped: the Ray cluster offers no GPU although this machine has one",
            "start the cluster on the GPU node (`ray start` finds its GPUs), or join one with --address",
        )
    from sylva_ray.distributed.probes import probe_fractional_gpu

    try:
        seen = probe_fractional_gpu(PROBE_GPU_SHARE, MATMUL_SIZE, PROBE_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as exc:
        return failed(name, str(exc), "check `ray status`: every GPU share may be taken, or a node's workers broken")
    if seen.device_name is None or not seen.finite:
        return failed(
            name,
            f"Ray gave the actor GPU {seen.ray_gpu_ids} (CUDA_VISIBLE_DEVICES={seen.cuda_visible_devices!r}) but torch "
            "there " + ("sees no CUDA device" if seen.device_name is None else "computed non-finite numbers"),
            "check the node's driver and that the workers' environment does not hide the GPUs",
        )
    return Check(
        name,
        True,
        f"num_gpus={seen.share:g} got GPU {seen.ray_gpu_ids} ({seen.device_name}): {MATMUL_SIZE}² matmul in "
        f"{seen.matmul_s * MS_PER_S:.1f} ms; answered {seen.answer_s:.1f} s after it was asked for",
    )


def step_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration of the timed step: ``cfg`` itself when it trains the paper's model, else the
    ``paper`` preset with ``cfg``'s batch size and training attack steps; no pre-trained weights."""
    from sylva_ray.engine.resolve import load_config

    paper = load_config(PAPER_PRESET, check_paths=False)
    if cfg.model.name == paper.model.name:
        base = cfg
    else:
        base = load_config(
            PAPER_PRESET,
            overrides=[f"train.batch_size={cfg.train.batch_size}", f"attack.train_steps={cfg.attack.train_steps}"],
            check_paths=False,
        )
    return dataclasses.replace(base, model=dataclasses.replace(base.model, pretrained="none"))


def step_inputs(cfg: ExperimentConfig) -> tuple[tuple[int, int, int], int]:
    """Image shape and classes of the step: the dataset's when known without reading it, else CIFAR-10's."""
    from sylva_ray.method.data import known_inputs

    known = known_inputs(cfg.data.name) or known_inputs(PAPER_DATASET)
    return known.image_shape, known.num_classes  # type: ignore[union-attr]


@dataclass(frozen=True)
class StepTiming:
    """One optimiser step's seconds and, on CUDA, the peak bytes torch's allocator held (None on the CPU)."""

    seconds: float
    peak_bytes: Optional[int]


def timed_train_step(
    model: "nn.Module",
    cfg: ExperimentConfig,
    image_shape: Sequence[int],
    num_classes: int,
    device: torch.device,
    precision: str,
) -> StepTiming:
    """One step of the training loop itself (``training.local_step``: the training attack, the
    forwards, the loss, backward, the optimiser step) at ``precision``, after one warm-up step.

    Timed by synchronising the device around the step; the peak is the allocator's over the timed
    step (weights, optimiser state and activations), as ``method.cost`` estimates it.
    """
    from sylva_ray.method.cost import synthetic_step
    from sylva_ray.method.training import local_step

    images = torch.rand(cfg.train.batch_size, *image_shape, generator=torch.Generator().manual_seed(0))
    model.train()
    with tf32_matmuls(precision == "tf32"):
        ctx, labels = synthetic_step(model, cfg, cfg.train.batch_size, image_shape, num_classes, precision, device)
        local_step(ctx, images, labels, attack_seed=0, dropout_seed=0)  # warm-up: kernels, allocator, optimiser state
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        local_step(ctx, images, labels, attack_seed=1, dropout_seed=1)
        synchronize(device)
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StepTiming(seconds, peak)


def memory_estimates(cfg: ExperimentConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, float]:
    """``sylva-ray bench memory``'s estimate of the training peak at each step precision (its
    ``train_peak_gb``, in GiB: weights, optimiser state and the activations of the batch)."""
    from sylva_ray.method.cost import algorithm_needs_benign, estimate_actor_memory

    needs_benign = algorithm_needs_benign(cfg)
    estimates: dict[str, float] = {}
    for precision in STEP_PRECISIONS:
        same = SAME_MEMORY_AS.get(precision)
        if same in estimates:
            estimates[precision] = estimates[same]
            continue
        at = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision=precision))
        estimates[precision] = estimate_actor_memory(at, image_shape, num_classes, needs_benign)["train_peak_gb"]
    return estimates


def train_step_check(
    index: int, cfg: ExperimentConfig, step_cfg: ExperimentConfig, estimates: dict[str, float]
) -> Check:
    """One paper-shape training step (ViT-B/16 from random weights, the training attack and the
    optimiser step) at fp32, TF32 and bf16: its seconds and peak memory beside the estimate that
    sized the presets, and whether the configured precision's peak fits a client's GPU share."""
    from sylva_ray.distributed.placement import cuda_memory_fraction
    from sylva_ray.method.cost import client_model

    name = f"train step cuda:{index}"
    device = torch.device("cuda", index)
    image_shape, num_classes = step_inputs(step_cfg)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    parts, peaks = [], {}
    try:
        model = client_model(step_cfg, num_classes).to(device)
        for precision in STEP_PRECISIONS:
            if precision == "bf16" and not bf16:
                parts.append("bf16 n/a")
                continue
            timing = timed_train_step(model, step_cfg, image_shape, num_classes, device, precision)
            peaks[precision] = timing.peak_bytes or 0
            parts.append(
                f"{precision} {timing.seconds:.2f} s, {peaks[precision] / BYTES_PER_GIB:.1f} GiB "
                f"(estimate {estimates[precision]:.1f})"
            )
    except RuntimeError as exc:  # torch.OutOfMemoryError included
        return failed(
            name,
            f"{step_cfg.model.name} batch {step_cfg.train.batch_size}: {type(exc).__name__}: {str(exc)[:ERROR_CHARS]}",
            "lower train.batch_size, or use runtime.precision=bf16 (about half the activations)",
        )
    finally:
        torch.cuda.empty_cache()
    shape = "x".join(str(s) for s in image_shape)
    result = (
        f"{step_cfg.model.name} ({shape} inputs), batch {step_cfg.train.batch_size}, "
        f"{step_cfg.attack.train_steps}-step attack: " + "; ".join(parts)
    )
    share = float(cfg.runtime.client_resources.get("num_gpus", 0.0))
    peak = peaks.get(cfg.runtime.precision)
    if share > 0 and peak and cfg.model.name == step_cfg.model.name:  # the step is this run's own shape
        card = torch.cuda.get_device_properties(index)
        try:
            cap = cuda_memory_fraction(share, card.total_memory, card.name) * card.total_memory
        except RuntimeError as exc:
            return failed(name, result, str(exc))
        if peak > cap:
            return warned(
                name,
                result,
                f"at runtime.precision={cfg.runtime.precision} the step's {peak / BYTES_PER_GIB:.1f} GiB exceed a "
                f"client actor's cap of {cap / BYTES_PER_GIB:.1f} GiB at num_gpus={share:g}: raise the share, lower "
                "train.batch_size, or use bf16",
            )
    return Check(name, True, result)


def gpu_checks(cfg: ExperimentConfig, cluster: Cluster) -> list[Check]:
    """Per visible CUDA device: matmul and bf16/TF32, then the Ray actor once, then the training step."""
    if not torch.cuda.is_available():
        return [Check("gpu", True, "no GPU visible")]
    count = torch.cuda.device_count()
    checks: list[Check] = []
    for index in range(count):
        checks += [matmul_check(index), precision_check(index, cfg)]
    checks.append(gpu_actor_check(cluster))
    step_cfg = step_config(cfg)
    estimates = memory_estimates(step_cfg, *step_inputs(step_cfg))
    checks += [train_step_check(index, cfg, step_cfg, estimates) for index in range(count)]
    return checks


# --- another run's environment -------------------------------------------------------------------
def against_dir(against: Optional[str | Path]) -> Optional[Path]:
    """``--against`` as a folder, refused before any check when it is not one."""
    if against is None:
        return None
    path = Path(against).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--against {against}: no such run directory; give a run's folder (runs/<timestamp>-<name>, or the "
            "--out of a run)"
        )
    return path


def clients_device(cfg: ExperimentConfig, cluster: Cluster) -> str:
    """Where the clients of ``cfg`` would compute here, as a run records it (a client's
    ``resolve_device``): ``cuda`` where they get a GPU (a share on a cluster with GPUs; a visible
    GPU for the in-process engine), else ``cpu``."""
    if cfg.runtime.device != "auto":
        return cfg.runtime.device
    if cfg.runtime.engine == "inprocess":
        return "cuda" if torch.cuda.is_available() else "cpu"
    share = float(cfg.runtime.client_resources.get("num_gpus", 0.0))
    return "cuda" if share > 0 and cluster.gpus > 0 else "cpu"


def against_check(run_dir: Optional[Path], cfg: ExperimentConfig, cluster: Cluster) -> Check:
    """Whether RUN's figures should repeat here digit for digit: its recorded environment against
    this one, on the fields the arithmetic depends on (``environment.REPEATABILITY_FIELDS``, most
    decisive first; the first that differs is named)."""
    name = "against"
    if run_dir is None:
        return Check(name, True, "skipped: no --against RUN")
    from sylva_ray.engine.environment import environment_record, read_environment, repeat_differences

    try:
        recorded = read_environment(run_dir)
    except (OSError, ValueError) as exc:
        return warned(name, f"{run_dir / ENVIRONMENT_FILE} is unreadable ({exc})", "compare the run's setup by hand")
    if recorded is None:
        return Check(
            name,
            True,
            f"{run_dir} has no {ENVIRONMENT_FILE} (runs made before it was recorded): nothing to compare",
        )
    here = environment_record(device=clients_device(cfg, cluster))
    differences = repeat_differences(recorded, here)
    if not differences:
        return Check(name, True, "figures should repeat here")
    field_name, there, ours = differences[0]
    others = [d[0] for d in differences[1:]]
    result = f"figures may differ: {field_name} {there!r} there, {ours!r} here" + (
        f" (also {', '.join(others)})" if others else ""
    )
    return warned(name, result, "compare figures with a run made here, or rerun on a machine like the recorded one")


# --- the table -----------------------------------------------------------------------------------
def _logged(check: Check) -> Check:
    level = logging.ERROR if not check.ok else logging.WARNING if check.warning else logging.INFO
    log.log(level, "%s: %s%s", check.name, check.result, f" -> {check.fix}" if check.fix else "")
    return check


def shown_result(check: Check) -> str:
    """The result as the table shows it: failures and warnings say so first."""
    prefix = "FAILED: " if not check.ok else "warning: " if check.warning else ""
    return prefix + check.result


def table(checks: Sequence[Check]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "check": [c.name for c in checks],
            "result": [shown_result(c) for c in checks],
            "what to do": [c.fix for c in checks],
        }
    )


def to_text(frame: pd.DataFrame) -> str:
    """The table as text, every column left-aligned (pandas right-aligns strings by default), no
    trailing blanks where a row has nothing to do."""
    widths = {col: max([len(col), *map(len, frame[col])]) for col in frame.columns}
    formatters: dict[str, Callable[[Any], str]] = {col: (lambda v, w=widths[col]: f"{v:<{w}}") for col in frame.columns}
    text = frame.to_string(index=False, formatters=formatters, justify="left")
    return "\n".join(line.rstrip() for line in text.splitlines())


def guarded(name: str, step: Callable[[], list[Check]]) -> list[Check]:
    """A step's rows, or one failed row when it raised: the doctor runs where things are broken,
    and one broken check must not hide the others."""
    try:
        return step()
    except Exception as exc:
        log.debug("the %s check raised", name, exc_info=True)
        return [failed(name, f"the check itself failed: {type(exc).__name__}: {exc}", "run with --log-level DEBUG")]


def run_doctor(
    cfg: ExperimentConfig, address: Optional[str] = None, against: Optional[str | Path] = None
) -> tuple[pd.DataFrame, int]:
    """Every check in order; the table and the exit code (0: a run of ``cfg`` can start here)."""
    run_dir = against_dir(against)  # a wrong --against is an error before any work
    address = address if address is not None else cfg.runtime.address
    cluster = Cluster()
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("imports", lambda: [imports_check()]),
        ("torch threads", lambda: [threads_check(cfg)]),
        ("weight cache", lambda: [cache_check(cfg)]),
        ("disk", lambda: [disk_check(cfg)]),
        ("ray", lambda: [ray_check(cfg, address, cluster)]),
        ("resources", lambda: [resources_check(cfg, cluster)]),
        ("gpu", lambda: gpu_checks(cfg, cluster)),
        ("against", lambda: [against_check(run_dir, cfg, cluster)]),
    ]
    checks: list[Check] = []
    for name, step in steps:
        checks += [_logged(check) for check in guarded(name, step)]
    broken = [c.name for c in checks if not c.ok]
    if broken:
        log.error("doctor: %d check(s) failed: %s", len(broken), ", ".join(broken))
    else:
        warnings = sum(c.warning for c in checks)
        log.info("doctor: a run of %r can start here (%d checks, %d warning(s))", cfg.name, len(checks), warnings)
    return table(checks), 1 if broken else 0
