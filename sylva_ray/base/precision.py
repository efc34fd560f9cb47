"""Arithmetic on the device: training precision, deterministic kernels, fp32 evaluation.

* ``runtime.precision``: ``fp32`` (default; TF32 off, so a GPU computes what a CPU computes),
  ``tf32`` (TF32 tensor-core matmuls and convolutions on Ampere and newer), ``bf16`` (autocast of
  the training forward passes, the training attack included; no loss scaling is needed for bf16).
* Evaluation attacks always run in full fp32 (autocast off, TF32 off): a weaker, lower-precision
  attack gradient finds fewer adversarial examples and so *overstates* robust accuracy.
* ``runtime.deterministic``: deterministic torch kernels, cuBLAS's fixed workspace
  (``CUBLAS_WORKSPACE_CONFIG``, which must be set before the first cuBLAS call, so before CUDA is
  touched in the process), no cuDNN autotuning. The bilinear resize inside the model has no
  deterministic CUDA backward; ``models.PixelSpaceModel`` then resizes by two matrix products.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

#: cuBLAS workspace setting that makes its kernels deterministic (CUDA docs, "Results reproducibility").
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def configure_runtime(precision: str, deterministic: bool) -> None:
    """Set this process's torch flags for ``runtime.precision`` and ``runtime.deterministic``.

    Both ways: a process that runs several runs in turn (in-process runs, a notebook, the benches)
    must not keep one run's deterministic kernels for the next. cuBLAS's workspace setting stays
    once set (it is read when cuBLAS starts); it costs a little memory and changes no result.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: results could vary run to run
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def runtime_flags() -> dict[str, object]:
    """This process's switches that ``configure_runtime`` sets, read back from torch itself."""
    return {
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


@contextlib.contextmanager
def training_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Forward passes of training (and of the training attack) under ``runtime.precision``."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def fp32_evaluation(device: torch.device) -> Iterator[None]:
    """Evaluation and its attacks in full fp32, whatever the training precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
