"""How many client actors, with which resources: pure functions over what the cluster reports.

Ray resources are logical: ``num_gpus=0.25`` reserves a quarter of a GPU in the scheduler's books
but does not stop a process from filling the card (METHOD.md); the client actor therefore also
caps its CUDA memory share to the same fraction. A GPU request on a cluster without GPUs is dropped
with a warning, so one config runs on a laptop and on a GPU cluster.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger(__name__)

#: config key -> Ray's resource name in ``ray.cluster_resources()``
RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
_HOST_PORT = re.compile(r"^(ray://)?(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


class PlacementError(RuntimeError):
    """The cluster cannot place even one client actor; the message names the field to change."""


@dataclass(frozen=True)
class PoolPlan:
    size: int
    actor_options: dict[str, object]
    gpu_fraction: float
    slots: int


def _ray_name(key: str) -> str:
    return key.removeprefix("custom:") if key.startswith("custom:") else RAY_RESOURCE_NAMES[key]


def plan_pool(
    cluster: Mapping[str, float],
    client_resources: Mapping[str, float],
    num_clients: int,
    num_actors: Optional[int] = None,
) -> PoolPlan:
    """Actors = min(clients, what fits the cluster, ``num_actors``); the rest are virtual clients.

    ``cluster`` is ``ray.cluster_resources()`` (or a placement group's bundle totals under Tune).
    """
    request = dict(client_resources)
    if request.get("num_gpus", 0) > 0 and cluster.get("GPU", 0) <= 0:
        log.warning("runtime.client_resources asks for num_gpus=%s but the cluster has no GPU: running on CPU", request["num_gpus"])
        request.pop("num_gpus")
    positive = {k: v for k, v in request.items() if v > 0}
    if not positive:
        raise PlacementError("runtime.client_resources has no positive resource left to place actors by; set num_cpus >= 0.5")
    fits = {k: math.floor(cluster.get(_ray_name(k), 0) / v + 1e-9) for k, v in positive.items()}
    slots = min(fits.values())
    if slots < 1:
        have = {k: cluster.get(_ray_name(k), 0) for k in positive}
        raise PlacementError(f"runtime.client_resources={dict(positive)} cannot be placed: the cluster has {have}; lower the request")
    size = min(num_clients, slots, num_actors or num_clients)
    options: dict[str, object] = {}
    for key, value in request.items():
        if key in ("num_cpus", "num_gpus", "memory"):
            options[key] = value
        else:
            options.setdefault("resources", {})[_ray_name(key)] = value  # type: ignore[index]
    options.setdefault("num_cpus", 0)
    return PoolPlan(size=size, actor_options=options, gpu_fraction=float(request.get("num_gpus", 0.0)), slots=slots)


def threads_for(client_resources: Mapping[str, float], explicit: Optional[int]) -> int:
    """Torch threads per actor: explicit, else its CPU share (>= 1). Equal threads in every actor
    keep float reductions, and so results, identical whatever the number of actors."""
    if explicit is not None:
        return explicit
    return max(1, int(client_resources.get("num_cpus", 1)))


def address_problem(address: str) -> Optional[str]:
    """What is wrong with a ``--address`` value, or None (format only; reachability is checked at connect)."""
    if address in {"auto", "local"}:
        return None
    match = _HOST_PORT.match(address)
    if not match:
        return "expected host:port, ray://host:port, auto or local (e.g. 127.0.0.1:6379)"
    if not 0 < int(match.group("port")) < 65536:
        return "port must be between 1 and 65535"
    return None
