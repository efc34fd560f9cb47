"""Which GPUs a Ray process sees: none, unless it reserved some.

Ray 2.60 no longer sets ``CUDA_VISIBLE_DEVICES=""`` for a process with ``num_gpus=0`` (Ray issue
54868; ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1`` on every node would restore it, but a run cannot
set that on a cluster it joins). Such a process sees every GPU of its node, and with
``runtime.device=auto`` a client actor there would train on ``cuda:0`` with no memory cap, beside
the actors that did reserve the card. Every process this package starts without a GPU share (a
client actor whose share was dropped, the driver actor, a Tune trial's own process) therefore
hides the GPUs itself, first thing, before CUDA starts in it.
"""

from __future__ import annotations

import logging
import os
import sys

import ray

log = logging.getLogger(__name__)

#: The variable that hides NVIDIA GPUs from a process (read once, when CUDA starts in it).
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def hide_unreserved_gpus() -> bool:
    """In a Ray worker that reserved no GPU, hide every GPU from CUDA; True when it did."""
    if ray.get_gpu_ids():
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late to hide: say so rather than pretend
        log.warning("CUDA was initialised in this process before its GPUs could be hidden; it may use them")
    os.environ[CUDA_VISIBLE_DEVICES] = ""
    return True
