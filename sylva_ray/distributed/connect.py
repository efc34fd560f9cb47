"""Where a run executes: joining or starting a Ray cluster, and what can be known before it starts.

check_before_start(cfg)   every check a run can make before a run directory exists or Ray
                          starts: the engine's preflight (model, data, weights), this
                          machine's CPUs and CUDA for a one-machine run, and a TCP probe of
                          ``--address`` (seconds, instead of Ray's minutes of retries);
                          torch-free on request (``sylva-ray run``: the model checks in a child)
connect(address, dashboard)  ``ray.init``: join a cluster, or start a local one (dashboard opt-in)
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.engine.preflight import preflight

#: Seconds to wait for a TCP answer from a cluster address before calling it unreachable.
CONNECT_PROBE_TIMEOUT_S = 3.0
#: ``runtime.address`` values that name no host to probe.
NO_HOST_ADDRESSES = (None, "auto", "local")


def check_before_start(cfg: ExperimentConfig, *, data: bool = True, torch_free: bool = False) -> None:
    """Refuse a run that cannot work, before any work: ``ConfigError`` or ``ConnectionError``.

    ``torch_free``: this process launches a Ray run and should not load torch (``sylva-ray run``):
    the model-side checks then run in a child process while this one checks the data
    (``engine.preflight``) -- unless this process holds torch already, where a child would only
    import it again (a sweep, a comparison, a notebook, the tests)."""
    ray_engine = cfg.runtime.engine == "ray"
    if not ray_engine:
        check_local_device(cfg)
    here = runs_on_this_machine_only(cfg)
    preflight(
        cfg,
        data=data,
        local_cpus=(os.cpu_count() or 1) if ray_engine and here else None,
        cuda_here=ray_engine and here,
        torch_free=torch_free and ray_engine and "torch" not in sys.modules,
    )
    if ray_engine and cfg.runtime.address not in NO_HOST_ADDRESSES:
        probe_address(cfg.runtime.address)  # type: ignore[arg-type]


def cluster_can_grow() -> bool:
    """Whether resources missing now may still appear (an autoscaler, nodes joining): False when
    this process's ``ray.init`` started the head itself (``Node.head``), as on a laptop."""
    import ray

    return not bool(getattr(ray._private.worker.global_worker.node, "head", False))


def connect(address: Optional[str], dashboard: bool = False) -> None:
    """Join a running cluster, or start a local one; reuse Ray if this process already started it.

    A ``host:port`` address is probed with a short TCP connect first: an unreachable cluster is a
    clear error in seconds instead of Ray's minutes of retries. A local cluster starts without the
    dashboard unless ``dashboard`` (``runtime.dashboard``, ``--dashboard``): on a simulation nobody
    watches, its head modules are ~200 MB of memory and a second of CPU at start-up (docs
    explanation/engine.md, 'Start-up and memory'); a cluster that is joined keeps whatever it runs.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address not in {"auto", "local"}:
        probe_address(address)
    starts_here = address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    # Only for a cluster started here: ray.init forwards other arguments to a Ray Client server.
    ray.init(address=address, log_to_driver=True, **({"include_dashboard": dashboard} if starts_here else {}))


def probe_address(address: str) -> None:
    """Raise ``ConnectionError`` unless something accepts a TCP connection at ``host:port``."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"runtime.address / --address {address!r}: nothing answers there ({exc}); start the cluster with "
            "`ray start --head` (or `ray up`) and pass the address it prints, or omit --address to run locally"
        ) from None


def runs_on_this_machine_only(cfg: ExperimentConfig) -> bool:
    """True for the in-process engine, and for a Ray run that will start (or has started, in this
    process) its own one-machine cluster: no ``--address``, no ``RAY_ADDRESS`` (set inside
    ``ray job submit`` jobs), not a worker of an existing cluster (a Tune trial)."""
    if cfg.runtime.engine == "inprocess":
        return True
    if cfg.runtime.address is not None or os.environ.get("RAY_ADDRESS"):
        return False
    import ray

    return not ray.is_initialized() or not cluster_can_grow()


def check_local_device(cfg: ExperimentConfig) -> None:
    """``runtime.device=cuda`` for a run on this machine alone where torch sees no CUDA: refused
    before any work, with what to set instead (on a cluster, the actors' GPU share decides)."""
    if cfg.runtime.device != "cuda" or not runs_on_this_machine_only(cfg):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device='cuda' but this machine has no CUDA device: use runtime.device=auto or cpu, "
            "or join a GPU cluster with --address (client actors then need runtime.client_resources.num_gpus)"
        )
