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
    """Set this process's torch flags for ``runtime.precision`` and ``runtime.deterministic``."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


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
