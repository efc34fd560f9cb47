"""Getting the client actors' resources from a cluster that may still be growing (Ray side).

A fresh ``ray up`` cluster is a head with 0 CPUs: the GPU workers exist only once something asks
for them. Planning the pool from what exists *now* fails at once there, so a run asks the
autoscaler for its bundles (``ray.autoscaler.sdk.request_resources``), waits with a progress line
until they fit node by node or ``runtime.resource_timeout_s`` passes, then plans. The request is
cleared once the actors hold their resources (it is a cluster-wide floor, last writer wins).

A cluster this process started itself (``ray.init()`` on a laptop) cannot grow: nothing is waited
for there, and a GPU request on a GPU-less laptop falls back to the CPU with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

import ray
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray.autoscaler.sdk import request_resources
from ray.experimental.internal_kv import _internal_kv_get
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.distributed.placement import (
    PlacementError,
    PoolPlan,
    Resources,
    actor_request,
    capacity,
    gpu_problem,
    plan_pool,
    shortfall,
    total,
    trial_gpu_problem,
    wanted_actors,
)

log = logging.getLogger(__name__)

#: Seconds between looks at the cluster while waiting, and between progress log lines.
POLL_INTERVAL_S, LOG_INTERVAL_S = 1.0, 30.0


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources, as Ray reports them."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def cluster_record() -> dict[str, Any]:
    """The connected cluster as ``environment.json`` records it: each alive node's address and
    resources (a run's actors may compute on other machines than the one that launched it)."""
    nodes = [
        {"address": node.get("NodeManagerAddress"), "resources": dict(node.get("Resources", {}))}
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return {"ray_version": ray.__version__, "nodes": nodes, "resources": ray.cluster_resources()}


def request_bundles(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for room for ``bundles`` (an empty list withdraws the request)."""
    request_resources(bundles=bundles)


def autoscaler_pending() -> Optional[int]:
    """Nodes Ray's autoscaler is launching or booting right now, from the status it publishes in
    the GCS key-value store (what ``ray status`` reads); None when no autoscaler reports."""
    try:
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw)["autoscaler_report"] if raw else None
    except (KeyError, TypeError, ValueError):
        return None
    if not report:
        return None
    return len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())


def wait_for_capacity(
    bundle: Resources,
    wanted: int,
    timeout_s: float,
    settle_s: float,
    what: str = "client actors",
    progress: bool = True,
) -> tuple[list[dict[str, float]], bool]:
    """Ask for ``wanted`` x ``bundle`` and wait until they fit; returns the nodes then and whether a
    request is outstanding (withdraw it with ``release_request``).

    While an autoscaler reports nodes being launched, the wait goes on (up to ``timeout_s``).
    Otherwise it ends once nothing new has come for ``settle_s``: with the actors that fit (a fixed
    cluster smaller than the pool, spot capacity that never comes), or, if none fits and an
    autoscaler is known to be idle, with an error. Raises ``PlacementError`` (naming what is
    missing) if not even one fits by then; the request is withdrawn on every failure.
    """
    nodes = alive_nodes()
    if capacity(nodes, bundle) >= wanted:
        return nodes, False
    request_bundles([dict(bundle)] * wanted)
    try:
        nodes = _wait(bundle, wanted, timeout_s, settle_s, what, progress)
    except BaseException:  # Ctrl-C, `ray job stop`: never leave a request that keeps GPU nodes alive
        release_request()
        raise
    fits = capacity(nodes, bundle)
    if fits < 1:
        release_request()
        raise PlacementError(
            f"runtime.client_resources: no {what} of {dict(bundle)} could be placed (waited up to "
            "runtime.resource_timeout_s="
            f"{timeout_s:g} s): {shortfall(nodes, bundle)}. Lower the request, check that the cluster's node types "
            "can hold it (`ray status`), or raise the timeout"
        )
    return nodes, True


def _wait(
    bundle: Resources, wanted: int, timeout_s: float, settle_s: float, what: str, progress: bool
) -> list[dict[str, float]]:
    nodes = alive_nodes()
    started = last_log = last_growth = time.monotonic()
    seen = capacity(nodes, bundle)
    log.info(
        "waiting up to %.0f s for the cluster to offer %d x %s for %s (now %d fit; `ray status` shows the autoscaler)",
        timeout_s,
        wanted,
        dict(bundle),
        what,
        seen,
    )
    with tqdm(total=wanted, desc=f"waiting for {what}", disable=not progress) as bar:
        while True:
            fits, pending, now = capacity(nodes, bundle), autoscaler_pending(), time.monotonic()
            if fits > seen or pending:
                seen, last_growth = max(seen, fits), now  # new capacity, or nodes on their way
            bar.n = min(fits, wanted)
            bar.set_postfix(nodes=len(nodes), launching=pending if pending is not None else "?")
            bar.refresh()
            settled = now - last_growth >= settle_s
            if fits >= wanted or now - started >= timeout_s or (settled and (fits >= 1 or pending == 0)):
                break
            if now - last_log >= LOG_INTERVAL_S:
                log.info(
                    "still waiting: %d of %d %s fit after %.0f s (%d nodes, %s launching)",
                    fits,
                    wanted,
                    what,
                    now - started,
                    len(nodes),
                    pending if pending is not None else "unknown",
                )
                last_log = now
            time.sleep(POLL_INTERVAL_S)
            nodes = alive_nodes()
    fits = capacity(nodes, bundle)
    if 1 <= fits < wanted:
        log.warning(
            "only %d of %d %s fit after %.0f s: starting with %d (the other clients share them; "
            "set runtime.num_actors=%d to start at once next time)",
            fits,
            wanted,
            what,
            time.monotonic() - started,
            fits,
            fits,
        )
    elif fits >= wanted:
        log.info("%d %s fit after %.0f s on %d nodes", wanted, what, time.monotonic() - started, len(nodes))
    return nodes


def acquire_pool(cfg: ExperimentConfig, can_grow: bool, progress: bool = True) -> tuple[PoolPlan, bool]:
    """The client-actor pool for a run, waiting for an autoscaler where the cluster can grow;
    returns the plan and whether an autoscaler request is outstanding (``release_request``).

    Refuses, before any actor starts, a request that would leave GPUs unused by training
    (``placement.gpu_problem``), checked again on the nodes that came up.
    """
    runtime = cfg.runtime
    nodes = alive_nodes()
    if not can_grow:
        plan = plan_pool(
            nodes, runtime.client_resources, cfg.data.num_clients, runtime.num_actors, drop_gpu_without_gpus=True
        )
        check_gpus(cfg, nodes)
        return plan, False
    check_gpus(cfg, nodes)
    requested = False
    if (
        runtime.resource_timeout_s > 0 and not ray.util.client.ray.is_connected()
    ):  # Ray Client cannot ask the autoscaler
        bundle = actor_request(runtime.client_resources)
        wanted = wanted_actors(cfg.data.num_clients, runtime.num_actors)
        nodes, requested = wait_for_capacity(
            bundle, wanted, runtime.resource_timeout_s, runtime.resource_settle_s, progress=progress
        )
    try:
        check_gpus(cfg, nodes)
        plan = plan_pool(
            nodes, runtime.client_resources, cfg.data.num_clients, runtime.num_actors, drop_gpu_without_gpus=False
        )
    except BaseException:
        if requested:
            release_request()
        raise
    return plan, requested


def check_gpus(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> None:
    """``placement.gpu_problem`` on these nodes, as a ``PlacementError``."""
    problem = gpu_problem(cfg.runtime.client_resources, cfg.runtime.device, total(nodes, "GPU"))
    if problem:
        raise PlacementError(problem)


def release_request() -> None:
    """Withdraw this process's autoscaler request (the actors now hold what they need)."""
    try:
        request_bundles([])
    except Exception as exc:  # the cluster may already be gone at teardown: nothing to withdraw then
        log.debug("could not withdraw the resource request: %s", exc)


def landed_nodes(placement_group: Any) -> list[dict[str, float]]:
    """The total resources of each alive node that holds a bundle of ``placement_group``."""
    landed = set(ray.util.placement_group_table(placement_group)["bundles_to_node_id"].values())
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive") and node["NodeID"] in landed]


def check_trial_gpus(cfg: ExperimentConfig, plan: PoolPlan, placement_group: Any) -> None:
    """``placement.trial_gpu_problem`` on the nodes this trial's bundles landed on, as a ``PlacementError``."""
    problem = trial_gpu_problem(
        cfg.runtime.client_resources, cfg.runtime.device, plan.gpu_fraction, landed_nodes(placement_group)
    )
    if problem:
        raise PlacementError(problem)


def bundles_of(placement_group: Any) -> Optional[list[dict[str, float]]]:
    """A Tune trial's client bundles (all but bundle 0, the driver's), or None outside a trial."""
    if placement_group is None:
        return None
    return [dict(bundle) for bundle in placement_group.bundle_specs[1:]]
