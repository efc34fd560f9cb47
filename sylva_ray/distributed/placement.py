"""How many client actors, with which resources: pure functions over what the cluster reports.

Ray resources are logical: ``num_gpus=0.25`` reserves a quarter of a GPU in the scheduler's books
but does not stop a process from filling the card; the client actor therefore also caps its CUDA
memory share to the same fraction. Planning is per node, as Ray places actors: a bundle of
``{CPU: 4, GPU: 1}`` fits only where both are on one node, so two nodes with 2 CPUs + 1 GPU each
hold none, whatever the cluster's totals say.

On a cluster this process started itself (a laptop), nothing can appear later: a GPU request is
dropped with a warning there, so one config runs on a laptop and on a GPU cluster. On a cluster
that can grow (``ray up``'s autoscaler), the request is kept and waited for (``capacity.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

#: config key -> Ray's resource name in ``ray.cluster_resources()`` / ``ray.nodes()``
RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
#: Resource shares are floats; Ray books them in 1/10000 units, so compare with this slack.
RESOURCE_EPSILON = 1e-9

Resources = Mapping[str, float]


class PlacementError(RuntimeError):
    """The cluster cannot place even one client actor; the message names the field to change."""


class GPUMemoryError(RuntimeError):
    """CUDA ran out of memory in a client actor: a sizing error, not a flaky client, so the run stops."""


class ActorStartError(RuntimeError):
    """A client actor's constructor refused its input (a user error raised while it built its
    model): every actor would fail the same way, so the run stops before round 1."""


#: Memory a CUDA process needs outside torch's allocator (context, cuBLAS/cuDNN workspaces): kept
#: out of the allocator's cap, or two actors at half a card each could still overfill it.
CUDA_CONTEXT_RESERVE_BYTES = 1024**3
BYTES_PER_GIB = 1024**3


def cuda_memory_fraction(share: float, card_bytes: int, card_name: str = "GPU") -> float:
    """The fraction of the card torch's allocator may use in an actor holding ``share`` of it.

    Ray's ``num_gpus`` is bookkeeping only, so the actor caps itself to its share less the CUDA
    context's reserve. A share whose part of the card is no larger than that reserve would get a
    cap of 0 (every allocation fails): refused, with the smallest share that leaves 1 GiB to torch.
    """
    fraction = min(1.0, share) - CUDA_CONTEXT_RESERVE_BYTES / card_bytes
    if fraction <= 0:
        smallest = 2 * CUDA_CONTEXT_RESERVE_BYTES / card_bytes  # the reserve plus as much again for torch
        raise GPUMemoryError(
            f"runtime.client_resources.num_gpus={share:g} gives this actor {share * card_bytes / BYTES_PER_GIB:.2f} "
            f"GiB of a {card_bytes / BYTES_PER_GIB:.1f} GiB {card_name}, no more than the "
            f"{CUDA_CONTEXT_RESERVE_BYTES / BYTES_PER_GIB:g} GiB its CUDA context takes outside torch: nothing would "
            f"be left for the model. Use num_gpus >= {math.ceil(smallest * 100) / 100:g} (fewer actors per GPU)"
        )
    return fraction


@dataclass(frozen=True)
class PoolPlan:
    """``size`` actors with ``actor_options`` each; ``wanted`` is how many the run asked for."""

    size: int
    actor_options: dict[str, object]
    gpu_fraction: float
    wanted: int = 0


def _ray_name(key: str) -> str:
    return key.removeprefix("custom:") if key.startswith("custom:") else RAY_RESOURCE_NAMES[key]


def actor_request(client_resources: Resources) -> dict[str, float]:
    """``runtime.client_resources`` in Ray's resource names: one actor's bundle."""
    return {_ray_name(k): float(v) for k, v in client_resources.items() if v > 0}


def fits_on_node(node: Resources, bundle: Resources) -> int:
    """How many copies of ``bundle`` one node holds (every resource of a bundle on the same node).

    A GPU share below 1 must fit on *one* GPU (Ray never splits a fractional request across two),
    so a node holds ``floor(GPUs) * floor(1 / share)`` of them: 0.4 on a 2-GPU node is 2 x 2 = 4
    actors, not floor(2 / 0.4) = 5 (the fifth would stay pending and stall round 1).
    """
    counts = [_copies(key, node.get(key, 0.0), need) for key, need in bundle.items() if need > 0]
    return min(counts) if counts else 0


def _copies(key: str, available: float, need: float) -> int:
    if key == "GPU" and need < 1:
        return math.floor(available + RESOURCE_EPSILON) * math.floor(1 / need + RESOURCE_EPSILON)
    return math.floor(available / need + RESOURCE_EPSILON)


def capacity(nodes: Sequence[Resources], bundle: Resources) -> int:
    """Actors of shape ``bundle`` the nodes hold together, node by node."""
    return sum(fits_on_node(node, bundle) for node in nodes)


def wanted_actors(num_clients: int, num_actors: Optional[int]) -> int:
    return min(num_clients, num_actors or num_clients)


def _as_nodes(cluster: Union[Resources, Sequence[Resources]]) -> list[Resources]:
    return [cluster] if isinstance(cluster, Mapping) else list(cluster)


def total(nodes: Sequence[Resources], key: str) -> float:
    return float(sum(node.get(key, 0.0) for node in nodes))


def plan_pool(
    cluster: Union[Resources, Sequence[Resources]],
    client_resources: Resources,
    num_clients: int,
    num_actors: Optional[int] = None,
    *,
    drop_gpu_without_gpus: bool = True,
) -> PoolPlan:
    """Actors = min(clients, what fits node by node, ``num_actors``); the rest are virtual clients.

    ``cluster``: the alive nodes' resources (``ray.nodes()``), a single mapping standing for one
    node, or a Tune trial's client bundles (one actor each). ``drop_gpu_without_gpus``: on a
    cluster that cannot grow, a GPU request on a GPU-less cluster runs on the CPU with a warning.
    """
    nodes = _as_nodes(cluster)
    request = dict(client_resources)
    if drop_gpu_without_gpus and request.get("num_gpus", 0) > 0 and total(nodes, "GPU") <= 0:
        log.warning(
            "runtime.client_resources asks for num_gpus=%s but the cluster has no GPU: running on CPU",
            request["num_gpus"],
        )
        request.pop("num_gpus")
    bundle = actor_request(request)
    if not bundle:
        raise PlacementError(
            "runtime.client_resources has no positive resource left to place actors by; set num_cpus >= 0.5"
        )
    fits = capacity(nodes, bundle)
    wanted = wanted_actors(num_clients, num_actors)
    if fits < 1:
        raise PlacementError(
            f"runtime.client_resources={client_resources} cannot be placed: {shortfall(nodes, bundle)}; lower the "
            "request"
        )
    options: dict[str, object] = {}
    for key, value in request.items():
        if key in RAY_RESOURCE_NAMES:
            options[key] = value
        else:
            options.setdefault("resources", {})[_ray_name(key)] = value  # type: ignore[index]
    options.setdefault("num_cpus", 0)
    return PoolPlan(
        size=min(wanted, fits), actor_options=options, gpu_fraction=float(request.get("num_gpus", 0.0)), wanted=wanted
    )


def shortfall(nodes: Sequence[Resources], bundle: Resources) -> str:
    """Why no node holds ``bundle``: the largest amount of each resource any one node offers."""
    if not nodes:
        return "the cluster has no alive node"
    best = {key: max(node.get(key, 0.0) for node in nodes) for key in bundle}
    short = {key: need for key, need in bundle.items() if best[key] + RESOURCE_EPSILON < need}
    if short:
        return f"no node offers {short} (the most one node has: {best}; {len(nodes)} nodes)"
    return f"no single node offers all of {dict(bundle)} at once ({len(nodes)} nodes: {[dict(n) for n in nodes]})"


def gpu_problem(client_resources: Resources, device: str, cluster_gpus: float) -> Optional[str]:
    """What is wrong with the GPU side of a request, or None.

    A client actor without a GPU share sees no GPU (``client_actor.hide_unreserved_gpus``; Ray 2.60
    itself no longer hides them): without a share, clients on a GPU cluster would train on the CPU
    without a word.
    """
    share = float(client_resources.get("num_gpus", 0.0))
    if device == "cuda" and share <= 0:
        return (
            "runtime.device='cuda' but runtime.client_resources has no num_gpus: actors without a GPU share see "
            "no GPU; add a share, e.g. --set 'runtime.client_resources={num_cpus: 1, num_gpus: 0.25}'"
        )
    if device == "auto" and share <= 0 and cluster_gpus > 0:
        return (
            f"the cluster has {cluster_gpus:g} GPUs but runtime.client_resources={dict(client_resources)} asks for "
            "none, "
            "so every client would train on the CPU: add a share, e.g. --set 'runtime.client_resources={num_cpus: 1, "
            "num_gpus: 0.25}', or set runtime.device=cpu to use CPUs on purpose"
        )
    return None


def trial_gpu_problem(
    client_resources: Resources, device: str, bundle_gpu_share: float, landed_nodes: Sequence[Resources]
) -> Optional[str]:
    """``gpu_problem`` for a Tune trial, against the nodes its bundles landed on.

    A sweep sizes its trials' bundles once, from the GPUs alive when it starts (none, on a fresh
    autoscaling cluster); a trial whose client bundles hold no GPU can still land on a GPU node,
    where its clients would compute on the CPU beside idle GPUs. ``bundle_gpu_share``: the GPU
    share the trial's client bundles really hold (0 when the sweep dropped it).
    """
    resources = {k: v for k, v in client_resources.items() if k != "num_gpus"}
    if bundle_gpu_share > 0:
        resources["num_gpus"] = bundle_gpu_share
    problem = gpu_problem(resources, device, total(landed_nodes, "GPU"))
    if problem is None:
        return None
    return f"this Tune trial's client actors landed on nodes with GPUs, but its bundles hold none: {problem}"


def threads_for(client_resources: Resources, explicit: Optional[int]) -> int:
    """Torch threads per actor: explicit, else its CPU share (>= 1). Equal threads in every actor
    keep float reductions, and so results, identical whatever the number of actors."""
    if explicit is not None:
        return explicit
    return max(1, int(client_resources.get("num_cpus", 1)))
