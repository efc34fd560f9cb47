"""Byzantine clients: who is malicious and what each behaviour uploads -- pure functions, no Ray.

A behaviour acts on a client's *update*, the tensors it would upload minus the global tensors it
received (the LoRA factors for adapter algorithms, the whole model for full-model baselines), as
one flat vector laid out exactly as the ball tree flattens adapters (``flatten_state``: keys in
sorted order). The vector is turned back into tensors key by key (``unflatten_like``), so the
malicious upload has the same keys, shapes, dtypes and serialised size as an honest one.

Three kinds, by what the attacker knows:
    own        the client's own update only (sign_flip, scale, gaussian, free_rider): applied in
               the client's worker after its local training, so the upload *is* the attack
    colluding  omniscient and colluding (alie, ipm): the malicious clients train like everyone
               else; after collection the driver hands the round's honest updates to the attack,
               and every colluder uploads the one crafted vector (the published threat model)
    data       label_flip: the behaviour's ``poison`` hook turns the client's training data into
               what it trains on (flipped labels), through the normal loop, and it uploads what
               that training gives

The standard attacks are ByzFL's (LPD-EPFL): ``SignFlipping``, ``Gaussian``, ``ALittleIsEnough``,
``InnerProductManipulation``; labels are flipped by ByzFL's convention ``y -> C - 1 - y``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import numpy as np

from sylva_ray.base.config import AdversaryConfig, ExperimentConfig
from sylva_ray.base.registry import Registry
from sylva_ray.base.seeding import derive_seed, numpy_rng
from sylva_ray.method.update_space import flatten_state, numpy_global_seed, unflatten_like

if TYPE_CHECKING:  # torch loads where tensors are handled: checking a config never needs it
    import torch

    from sylva_ray.method.data import ArrayDataset

State = Mapping[str, "torch.Tensor"]
OWN, COLLUDING, DATA = "own", "colluding", "data"


@dataclass(frozen=True)
class Behaviour:
    """A registered behaviour: its kind, and what it does to the upload or to the data.

    ``craft(updates, cfg, context)`` (``own``, ``colluding``): ``updates`` is one row per vector the
    attacker sees (its own update for ``own``, the honest updates of the round for ``colluding``);
    returns the update to upload. ``context`` carries n (participants) and f (colluders) for the
    attacks that use them, and the seed of this client and round.
    ``poison(data, cfg, context)`` (``data``): the client's training split -> what it trains on
    instead (labels and/or images), before its local training.
    """

    kind: str
    craft: Optional[Callable[[np.ndarray, AdversaryConfig, "AttackContext"], np.ndarray]] = None
    poison: Optional[Callable[["ArrayDataset", AdversaryConfig, "AttackContext"], "ArrayDataset"]] = None

    def __post_init__(self) -> None:
        needs = {OWN: "craft", COLLUDING: "craft", DATA: "poison"}
        if self.kind not in needs:
            raise ValueError(f"a behaviour's kind is one of {sorted(needs)}, got {self.kind!r}")
        if getattr(self, needs[self.kind]) is None:
            raise ValueError(f"a {self.kind} behaviour needs its {needs[self.kind]} function")


@dataclass(frozen=True)
class AttackContext:
    participants: int
    colluders: int
    num_clients: int
    seed: int


BEHAVIOURS: Registry[Behaviour] = Registry("behaviour", Behaviour)


def _sign_flip(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    from byzfl import SignFlipping

    return cfg.flip_scale * SignFlipping()(updates)


def _scale(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    """Boosting / model replacement (Bagdasaryan et al. 2020): the update times gamma (default:
    the round's participants, which undoes an equal-weight mean's 1/n)."""
    boost = cfg.boost if cfg.boost is not None else float(context.participants or context.num_clients)
    return boost * updates.mean(axis=0)


def _gaussian(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    from byzfl import Gaussian

    with numpy_global_seed(context.seed):  # ByzFL draws from numpy's global generator
        return np.asarray(Gaussian(mu=float(cfg.noise_mean), sigma=float(cfg.noise_std))(updates), dtype=np.float64)


def _free_rider(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    """No work shared: the global tensors go back unchanged (a zero update)."""
    return np.zeros(updates.shape[1])


def alie_z_max(participants: int, colluders: int) -> float:
    """Baruch et al. 2019, 'A little is enough': s = floor(n/2 + 1) - f supporters are needed, and
    z_max = Phi^-1((n - s) / n) keeps the crafted vector inside the honest spread."""
    from scipy.stats import norm

    supporters = math.floor(participants / 2 + 1) - colluders
    # With half the round or more colluding, s <= 0 and z would be infinite: keep z finite at the
    # largest value one honest supporter allows (the attack needs no stealth then anyway).
    supporters = min(max(1, supporters), max(1, participants - 1))
    return float(norm.ppf((participants - supporters) / participants))


def _alie(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    from byzfl import ALittleIsEnough

    tau = cfg.alie_tau if cfg.alie_tau is not None else alie_z_max(context.participants, context.colluders)
    if len(updates) < 2:  # a standard deviation needs two honest updates: the mean is all there is
        return updates.mean(axis=0)
    return np.asarray(ALittleIsEnough(tau=float(tau))(updates), dtype=np.float64)


def _ipm(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    from byzfl import InnerProductManipulation

    return np.asarray(InnerProductManipulation(tau=float(cfg.ipm_tau))(updates), dtype=np.float64)


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """ByzFL's label flipping: class y becomes C - 1 - y."""
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def _label_flip(data: ArrayDataset, cfg: AdversaryConfig, context: AttackContext) -> ArrayDataset:
    """The same images under flipped labels."""
    return dataclasses.replace(data, labels=flip_labels(data.labels, data.num_classes))


BEHAVIOURS.add("sign_flip", Behaviour(OWN, _sign_flip))
BEHAVIOURS.add("scale", Behaviour(OWN, _scale))
BEHAVIOURS.add("gaussian", Behaviour(OWN, _gaussian))
BEHAVIOURS.add("free_rider", Behaviour(OWN, _free_rider))
BEHAVIOURS.add("alie", Behaviour(COLLUDING, _alie))
BEHAVIOURS.add("ipm", Behaviour(COLLUDING, _ipm))
BEHAVIOURS.add("label_flip", Behaviour(DATA, poison=_label_flip))


def attack_context(
    cfg: ExperimentConfig, round_index: int, client_id: Optional[int] = None, participants: int = 0, colluders: int = 0
) -> AttackContext:
    """The context of one attack: seeded by (run seed, round, client -- or the colluders as one),
    so the same on any actor."""
    if not participants:  # a client attacking alone knows the round's expected size, not who else came
        participants = max(1, int(round(cfg.federation.participation * cfg.data.num_clients)))
    return AttackContext(
        participants=participants,
        colluders=colluders,
        num_clients=cfg.data.num_clients,
        seed=derive_seed(cfg.runtime.seed, "adversary", round_index, "colluders" if client_id is None else client_id),
    )


def tolerated_f(cfg: ExperimentConfig) -> int:
    """``federation.byzantine_f``, or the adversary's own count when unset."""
    if cfg.federation.byzantine_f is not None:
        return int(cfg.federation.byzantine_f)
    return malicious_count(cfg.data.num_clients, cfg.adversary.fraction)


def malicious_count(num_clients: int, fraction: float) -> int:
    """fraction x clients rounded half up (0.25 of 10 clients is 3, not banker's 2)."""
    return int(math.floor(fraction * num_clients + 0.5))


def malicious_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The fixed malicious set: the first round(fraction x K) clients of a seeded permutation.

    The permutation depends on the seed alone, so at one seed the sets are nested (the 10% set is
    inside the 20% set) and identical across aggregation rules and algorithms.
    """
    order = numpy_rng(seed, "adversary").permutation(num_clients)
    return sorted(int(c) for c in order[: malicious_count(num_clients, fraction)])


def active(cfg: AdversaryConfig, round_index: int) -> bool:
    return cfg.fraction > 0 and round_index >= cfg.start_round


def poisoned_data(data: ArrayDataset, cfg: ExperimentConfig, round_index: int, client_id: int) -> ArrayDataset:
    """What a malicious client trains on this round: its behaviour's ``poison`` of its training
    split, or the split itself (behaviours that act on the upload)."""
    behaviour = BEHAVIOURS.get(cfg.adversary.behaviour)
    if behaviour.poison is None:
        return data
    return behaviour.poison(data, cfg.adversary, attack_context(cfg, round_index, client_id))


def update_vector(upload: State, reference: State) -> np.ndarray:
    """The update (upload - reference) flattened as the ball tree flattens adapters."""
    return flatten_state(upload) - flatten_state({k: reference[k] for k in upload})


def craft_own_upload(
    upload: State, reference: State, cfg: AdversaryConfig, context: AttackContext
) -> dict[str, torch.Tensor]:
    """A malicious client's upload from its own update (``own`` behaviours)."""
    behaviour = BEHAVIOURS.get(cfg.behaviour)
    if behaviour.kind != OWN:
        raise ValueError(
            f"adversary.behaviour={cfg.behaviour!r} is a {behaviour.kind} behaviour, not one applied to a client's "
            "own update"
        )
    update = behaviour.craft(update_vector(upload, reference)[None, :], cfg, context)  # type: ignore[misc]
    return unflatten_like(flatten_state({k: reference[k] for k in upload}) + update, upload)


def craft_colluding_upload(
    honest: Sequence[State], reference: State, cfg: AdversaryConfig, context: AttackContext
) -> dict[str, torch.Tensor]:
    """The one upload every colluder sends, from the round's honest uploads (``colluding`` behaviours)."""
    behaviour = BEHAVIOURS.get(cfg.behaviour)
    if behaviour.kind != COLLUDING:
        raise ValueError(f"adversary.behaviour={cfg.behaviour!r} is not a colluding behaviour")
    if not honest:
        raise ValueError("a colluding attack needs at least one honest update to see")
    updates = np.stack([update_vector(state, reference) for state in honest])
    crafted = behaviour.craft(updates, cfg, context)  # type: ignore[misc]
    template = honest[0]
    return unflatten_like(flatten_state({k: reference[k] for k in template}) + crafted, template)
