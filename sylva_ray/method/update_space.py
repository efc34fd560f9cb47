"""Client updates as vectors: the layout every Byzantine attack and robust rule shares.

An update is an upload minus the global tensors the round started from (``RoundContext.reference``),
flattened key by key in sorted order (``flatten_state``, the layout the ball tree uses) and cut
back into the template's tensors (``unflatten_like``). ``on_updates`` is the pipeline every rule
that works on updates runs in: flatten, the optional pre-aggregation steps
(``federation.pre_aggregation``, ByzFL's ``Clipping``, ``NNM``, ``Bucketing``), the rule, add back,
unflatten. Pure functions, no Ray; ByzFL is imported where it is used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import numpy as np

from sylva_ray.base.config import FederationConfig

if TYPE_CHECKING:  # torch loads where tensors are handled: checking a config never needs it
    import torch

State = Mapping[str, "torch.Tensor"]
#: pre-aggregation steps; mixing ones leave no per-client weight
PRE_AGGREGATIONS = ("clipping", "nnm", "bucketing")
MIXING = frozenset({"nnm", "bucketing"})
#: updates (n x d) -> (aggregated update, each row's weight in it)
VectorRule = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RoundContext:
    """What a rule may need beyond the uploads.

    ``reference``: the global tensors the uploads started from; rules that work on *updates*
    (the robust ones, and any rule after a pre-aggregation step) aggregate upload - reference and
    add the result back. None: the uploads themselves are aggregated (as vectors from zero).
    ``byzantine_f``: the number of Byzantine uploads Krum-type rules and NNM tolerate.
    ``seed``: for randomised steps (bucketing's shuffle).
    """

    reference: Optional[State] = None
    byzantine_f: int = 0
    seed: int = 0


#: No reference (the uploads are aggregated as they are), f = 0, seed 0.
NO_CONTEXT = RoundContext()


def check_same_keys(states: Sequence[State]) -> list[str]:
    if not states:
        raise ValueError("nothing to aggregate: no client updates")
    keys = sorted(states[0])
    for index, state in enumerate(states[1:], start=1):
        if sorted(state) != keys:
            raise KeyError(f"update {index} has other tensors than update 0")
    return keys


def flatten_state(state: State) -> np.ndarray:
    """One vector per client, keys in sorted order so every client lines up."""
    import torch

    return np.concatenate([state[k].detach().cpu().to(torch.float64).reshape(-1).numpy() for k in sorted(state)])


def unflatten_like(vector: np.ndarray, template: State) -> dict[str, torch.Tensor]:
    """``flatten_state``'s inverse: cut a vector key by key (sorted order) into the template's
    shapes and dtypes."""
    import torch

    expected = sum(tensor.numel() for tensor in template.values())
    if len(vector) != expected:
        raise ValueError(f"vector has {len(vector)} entries, the template {expected}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key in sorted(template):
        tensor = template[key]
        size = tensor.numel()
        piece = np.ascontiguousarray(vector[offset : offset + size])
        if not tensor.dtype.is_floating_point:  # counters (e.g. BatchNorm's num_batches_tracked) stay whole
            piece = np.rint(piece)
        out[key] = torch.from_numpy(piece).reshape(tensor.shape).to(tensor.dtype)
        offset += size
    return out


#: numpy's global generator is one per process; compare runs several federations as threads of
#: one process, so a seeded block holds this lock from seeding to restoring.
_GLOBAL_RNG_LOCK = threading.Lock()


class numpy_global_seed:
    """Seed numpy's global generator for a block and restore it after (ByzFL's Gaussian and
    Bucketing draw from it; nothing of ours does)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        _GLOBAL_RNG_LOCK.acquire()
        self.saved = np.random.get_state()
        np.random.seed(self.seed % (2**32))

    def __exit__(self, *exc: object) -> None:
        np.random.set_state(self.saved)
        _GLOBAL_RNG_LOCK.release()


def median_norm(updates: np.ndarray) -> float:
    """The data-dependent default radius: half the updates are longer, so clipping bites on the
    long half whatever the scale of the model's parameters."""
    norms = np.linalg.norm(updates, axis=1)
    radius = float(np.median(norms))
    return radius if radius > 0 else float(norms.max()) or 1.0


def pre_aggregate(updates: np.ndarray, cfg: FederationConfig, context: RoundContext) -> np.ndarray:
    """``federation.pre_aggregation`` in order (ByzFL's pre-aggregators)."""
    import byzfl

    for step in cfg.pre_aggregation:
        if step == "clipping":
            radius = cfg.clip_radius if cfg.clip_radius is not None else median_norm(updates)
            updates = np.asarray(byzfl.Clipping(c=float(radius))(updates.copy()), dtype=np.float64)
        elif step == "nnm":
            updates = np.asarray(byzfl.NNM(f=int(context.byzantine_f))(updates), dtype=np.float64)
        elif step == "bucketing":
            with numpy_global_seed(context.seed):  # ByzFL shuffles with numpy's global generator
                updates = np.asarray(byzfl.Bucketing(s=int(cfg.bucket_size))(updates), dtype=np.float64)
        else:
            raise KeyError(f"unknown pre-aggregation step {step!r}; choose from {PRE_AGGREGATIONS}")
    return updates


def on_updates(
    states: Sequence[State], cfg: FederationConfig, context: RoundContext, rule: VectorRule
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Flatten the updates, pre-aggregate, apply ``rule`` (vectors -> (vector, weights)), unflatten."""
    check_same_keys(states)
    template = states[0]
    base = (
        flatten_state({k: context.reference[k] for k in template})
        if context.reference is not None
        else np.zeros(sum(t.numel() for t in template.values()))
    )
    updates = np.stack([flatten_state(s) for s in states]) - base
    mixed = bool(MIXING.intersection(cfg.pre_aggregation))
    updates = pre_aggregate(updates, cfg, context)
    vector, weights = rule(updates)
    if mixed:
        weights = np.full(len(states), np.nan)
    return unflatten_like(base + np.asarray(vector, dtype=np.float64), template), np.asarray(weights, dtype=np.float64)
