"""What ``sylva-ray doctor`` asks Ray itself: the token-authentication mode, and whether an actor
holding a fraction of a GPU gets a working CUDA device.

Ray lives in ``sylva_ray.distributed`` only (``tests/test_architecture.py``), so the doctor
(``sylva_ray.experiments.doctor``) reaches Ray's API through these functions.

Token authentication in Ray 2.60: the mode is read from ``RAY_AUTH_MODE`` (``token`` or
``disabled``) by Ray's core; a ``ray.init()`` that starts a local cluster turns it on by default
(it sets ``RAY_AUTH_MODE=token`` and writes a token to ``~/.ray/auth_token`` when none exists),
and a process joining a cluster by address uses whatever its own environment says. A cluster
started with token authentication refuses drivers without the token; one started without it
accepts any.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch
from ray._private.authentication.authentication_utils import get_authentication_mode_name
from ray._raylet import get_authentication_mode
from ray.exceptions import GetTimeoutError, RayError

#: Ray's own variable for the authentication mode (``ray._private.authentication``).
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def authentication_mode() -> str:
    """This process's Ray authentication mode as Ray's core reads it: ``token`` or ``disabled``.

    Read after ``connect``: a local cluster started here then runs in this mode; a cluster
    joined here accepted this process in it.
    """
    return get_authentication_mode_name(get_authentication_mode())


@dataclass(frozen=True)
class GPUActorReport:
    """What an actor holding ``share`` of a GPU saw: Ray's GPU ids, ``CUDA_VISIBLE_DEVICES``, the
    card torch found (None: torch saw no CUDA device), a matmul's seconds there, and the seconds from
    asking for the actor to its answer (placement, process start, CUDA start)."""

    share: float
    ray_gpu_ids: list[str]
    cuda_visible_devices: Optional[str]
    device_name: Optional[str]
    matmul_s: Optional[float]
    finite: bool
    answer_s: float


class GPUProbe:
    """A throwaway actor: allocates two square matrices on its GPU and multiplies them once."""

    def run(self, size: int) -> dict[str, Any]:
        seen: dict[str, Any] = {
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_name": None,
            "matmul_s": None,
            "finite": False,
        }
        if not torch.cuda.is_available():
            return seen
        left, right = (torch.rand(size, size, device="cuda") for _ in range(2))
        torch.cuda.synchronize()
        started = time.perf_counter()
        product = left @ right
        torch.cuda.synchronize()
        seen.update(
            device_name=torch.cuda.get_device_name(),
            matmul_s=time.perf_counter() - started,
            finite=bool(torch.isfinite(product).all()),
        )
        return seen


def probe_fractional_gpu(share: float, size: int, timeout_s: float) -> GPUActorReport:
    """Start a ``GPUProbe`` with ``num_gpus=share`` (no CPU reserved), run it, kill it.

    Raises ``TimeoutError`` when Ray cannot place or run it within ``timeout_s`` (every GPU share
    taken, or a node that never comes), ``RuntimeError`` when the actor dies.
    """
    started = time.perf_counter()
    actor = ray.remote(GPUProbe).options(num_cpus=0, num_gpus=share).remote()
    try:
        seen = ray.get(actor.run.remote(size), timeout=timeout_s)
    except GetTimeoutError:
        raise TimeoutError(
            f"an actor asking for num_gpus={share:g} was not placed and run within {timeout_s:g} s"
        ) from None
    except RayError as exc:
        raise RuntimeError(f"the actor holding num_gpus={share:g} failed: {exc}") from None
    finally:
        ray.kill(actor, no_restart=True)
    return GPUActorReport(share=share, answer_s=time.perf_counter() - started, **seen)
