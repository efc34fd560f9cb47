"""What a run ran on: ``environment.json`` in every run directory, and the test of whether a
recorded run's figures should repeat here.

Figures of this project repeat digit for digit only where the arithmetic is the same: the same CPU
model (its vector units decide how torch sums), the same torch build and the same device. A run
directory therefore records the processor, the libraries and the accelerator beside its results;
``sylva-ray doctor --against RUN`` reads the record back and names the field that differs.

Ray-free: the cluster's nodes are added by the launcher, which is connected (``cluster=``).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import sylva_ray
from sylva_ray.base.storage import atomic_write_text

ENVIRONMENT_FILE = "environment.json"
#: The libraries whose versions decide a run's figures or its behaviour.
PACKAGES = (
    "sylva_ray",
    "torch",
    "ray",
    "timm",
    "peft",
    "torchattacks",
    "pyautoattack",
    "shapiq",
    "byzfl",
    "numpy",
    "pandas",
    "scikit-learn",
    "safetensors",
)
#: Fields (dotted paths into the record) on which digit-for-digit repetition depends, most decisive first.
REPEATABILITY_FIELDS = (
    "device",
    "cpu.model",
    "torch.cpu_capability",
    "torch.version",
    "gpus.0.name",
    "torch.cuda",
)
#: Prefix of the repeatability columns in compare and sweep tables.
ENV_PREFIX = "env."
#: Seconds ``git`` and ``nvidia-smi`` may take before their fields are left empty.
PROBE_TIMEOUT_S = 5


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions, read from package metadata (nothing is imported); None when absent."""
    versions: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The processor's marketing name (``/proc/cpuinfo`` on Linux, sysctl on macOS), else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        found = _probe(["sysctl", "-n", "machdep.cpu.brand_string"])
        if found:
            return found
    return platform.processor() or platform.machine()


def _probe(command: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    """A short command's first output line, or None if it is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def source_revision() -> dict[str, Any]:
    """The project's git commit and whether its tree had changes, when it runs from a checkout."""
    checkout = Path(sylva_ray.__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return {"commit": None, "dirty": None}
    commit = _probe(["git", "rev-parse", "HEAD"], cwd=checkout)
    status = None
    if commit is not None and shutil.which("git"):
        try:
            done = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=checkout,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                check=False,
            )
            status = bool(done.stdout.strip()) if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            status = None
    return {"commit": commit, "dirty": status}


def torch_record() -> dict[str, Any]:
    """torch's build and how it computes here: vector ISA, threads, CUDA and cuDNN versions."""
    import torch

    return {
        "version": str(torch.__version__),  # a TorchVersion: plain text travels to processes without torch
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }


def gpu_records() -> list[dict[str, Any]]:
    """Each visible GPU's model, memory and compute capability (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 2),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def compute_record() -> dict[str, Any]:
    """torch's record and the visible GPUs of this process: the part of the environment that only
    a process holding torch can read."""
    return {"torch": torch_record(), "gpus": gpu_records()}


def environment_record(
    device: Optional[str] = None,
    cluster: Optional[dict[str, Any]] = None,
    client_actors: Optional[list[dict[str, Any]]] = None,
    argv: Optional[list[str]] = None,
    compute: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The record of this process's environment; ``device``: where the clients compute, as they
    report it; ``client_actors``: each actor's own runtime (Ray engine); ``compute``: torch's
    record and the GPUs where the clients compute (``compute_record``), as a client actor read
    them -- a Ray run's launching process holds no torch -- or, by default, this process's."""
    compute = compute if compute is not None else compute_record()
    gpus = compute["gpus"]
    return {
        "command": " ".join(argv if argv is not None else sys.argv),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "version": sylva_ray.__version__,
        "source": source_revision(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "machine": platform.machine(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "torch": compute["torch"],
        "device": device,
        "gpus": gpus,
        "gpu_driver": _probe(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpus else None,
        "cluster": cluster,
        "client_actors": client_actors,
    }


def field(record: dict[str, Any], dotted: str) -> Any:
    """``record["a"]["b"][0]`` for ``"a.b.0"``; None where the path ends early."""
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def repeat_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, recorded value, value here)`` for each REPEATABILITY_FIELDS entry that differs."""
    return [
        (name, field(recorded, name), field(current, name))
        for name in REPEATABILITY_FIELDS
        if field(recorded, name) != field(current, name)
    ]


def repeat_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The REPEATABILITY_FIELDS of a record, flat (``env.cpu.model`` ...): columns for reports."""
    return {f"{ENV_PREFIX}{name}": field(record, name) for name in REPEATABILITY_FIELDS}


def write_environment(run_dir: Path, record: dict[str, Any]) -> Path:
    """The first session's record as ``environment.json``; a resumed session's is appended under
    ``resumed`` (a run continued elsewhere is then visible), the file rewritten atomically."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            existing = None
        if isinstance(existing, dict):
            existing.setdefault("resumed", []).append(record)
            record = existing
    return atomic_write_text(path, json.dumps(record, indent=2, default=str))


def read_environment(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run's ``environment.json`` (in it, or in the Phase-1 run a Phase-2 folder points to); None if absent."""
    for folder in (Path(run_dir), _phase1_of(Path(run_dir))):
        if folder is not None and (folder / ENVIRONMENT_FILE).is_file():
            return json.loads((folder / ENVIRONMENT_FILE).read_text())
    return None


def _phase1_of(folder: Path) -> Optional[Path]:
    pointer = folder / "phase1_run.txt"
    return Path(pointer.read_text().strip()) if pointer.is_file() else None
