"""One client's work -- train a round, evaluate -- on a model that is built once and reused.

``ClientWorker`` holds the pre-trained backbone wrapped with LoRA and the data pools; the
personal state of *any* client (what its scope keeps: the head, for LoRA) is passed in and
handed back, never kept here.
That is what lets one worker (and later one Ray actor) serve many virtual clients, and lets a
restarted worker pick up where the last one left off: the caller owns the state.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import nn

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plugins import load_plugins
from sylva_ray.base.precision import configure_runtime
from sylva_ray.base.seeding import derive_seed, torch_seeded
from sylva_ray.method.algorithms import algorithm_for
from sylva_ray.method.byzantine import BEHAVIOURS, OWN, attack_context, craft_own_upload, poisoned_data
from sylva_ray.method.data import (
    ArrayDataset,
    ClientData,
    DataSource,
    Partition,
    client_data,
    client_labels,
    global_test_set,
    majority_class_rate,
)
from sylva_ray.method.evaluation import EvalResult, evaluate
from sylva_ray.method.layer_selection import LayerGame, fuse, player_prefixes
from sylva_ray.method.models import PixelSpaceModel, full_model_nbytes, resolve_device
from sylva_ray.method.pretrained import build_pretrained_model, state_digest
from sylva_ray.method.training import RoundMetrics, adversarial_round
from sylva_ray.method.transfer import fit_linear_head

if TYPE_CHECKING:
    from sylva_ray.engine.transfer import FinalModels, TransferSource
    from sylva_ray.method.layer_selection import LayerGame

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
BYTES_PER_MB = 1024 * 1024
#: The pseudo-client id of the global test set: evaluating it scores the global model (FAT convention).
GLOBAL_TEST_CLIENT = -1


@dataclass
class ClientState:
    """A client's personal state; it lives with the driver, never in a worker.

    ``personal``: the tensors the scope keeps on the client (the head for ``lora``; the LoRA
    factors and the head for ``local``; nothing for ``full``).
    """

    personal: State
    rounds_trained: int = 0


@dataclass
class ClientUpdate:
    """What a client returns after a round: the adapter to upload and how it got there."""

    client_id: int
    adapter: State
    num_samples: int
    metrics: RoundMetrics
    state: ClientState = field(repr=False, default=None)  # type: ignore[assignment]


class ClientWorker:
    """Builds the model once; trains and evaluates any client given that client's state."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        source: DataSource,
        partition: Partition,
        backbone_state: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        """``backbone_state``: pre-trained weights resolved once by the driver; None resolves them here."""
        load_plugins(cfg.runtime.plugins)  # this process may be a fresh actor: your registrations first
        self.cfg = cfg
        self.source = source
        self.partition = partition
        configure_runtime(cfg.runtime.precision, cfg.runtime.deterministic)
        self.device = resolve_device(cfg.runtime.device)
        self.algorithm = algorithm_for(cfg)
        self.scope = self.algorithm.scope
        started = time.perf_counter()
        base = build_pretrained_model(cfg.model, cfg.data, source, backbone_state)
        #: Seconds to get the pre-trained model here (pre-training, or reading its weights): the run's
        #: ``pretraining`` stage when this worker resolved the weights itself (the in-process engine).
        self.pretraining_seconds = time.perf_counter() - started
        self.full_model_bytes = full_model_nbytes(base)
        self.backbone_digest = state_digest(base.backbone.state_dict())  # which pre-trained weights this run uses
        # Every worker draws the same initial LoRA A from the run seed, so all clients share one start.
        with torch_seeded(derive_seed(cfg.runtime.seed, "lora-init")):
            self.model = self.scope.wrap(base, cfg.lora).to(self.device)
        self.model.eval()
        self.initial_adapter = self.scope.shared(self.model)
        self.initial_personal = self.scope.personal(self.model)
        self._global_test: Optional[ArrayDataset] = None
        self._last_data: Optional[ClientData] = None
        self._games: OrderedDict[tuple[int, str], "LayerGame"] = OrderedDict()
        self._backbone_state = backbone_state  # the public transfer source is rebuilt from it
        self._public: Optional[PixelSpaceModel] = None
        self._public_heads: dict[Optional[int], tuple[State, str]] = {}

    def data(self, client_id: int) -> ClientData:
        """The client's train/test split, copied out of the pool; only the last one is kept.

        In an actor the pool is a zero-copy view of the one copy in Ray's object store. Keeping
        every client's copy would, with clients handed to whichever actor is free, end with a float
        copy of the whole pool in every actor (~600 MB for CIFAR-10); copying one client's share
        again costs milliseconds per job.
        """
        if self._last_data is None or self._last_data.client_id != client_id:
            self._last_data = client_data(self.source, self.partition, client_id)
        return self._last_data

    def majority_rate(self, client_id: int) -> float:
        """The client's majority-class floor, from its labels alone (no image is copied)."""
        train, test = client_labels(self.source, self.partition, client_id)
        return majority_class_rate(train, test, self.source.num_classes)

    def global_test(self) -> ArrayDataset:
        if self._global_test is None:
            self._global_test = global_test_set(self.source, self.partition)
        return self._global_test

    def initial_state(self) -> ClientState:
        return ClientState(personal={k: v.clone() for k, v in self.initial_personal.items()})

    def _load(self, shared: Mapping[str, torch.Tensor], state: ClientState) -> None:
        self.scope.load(self.model, {**shared, **state.personal})

    def train(
        self,
        client_id: int,
        state: ClientState,
        global_adapter: Mapping[str, torch.Tensor],
        round_index: int,
        malicious: bool = False,
    ) -> ClientUpdate:
        """Start from the received shared tensors and the client's own personal ones; train one round.

        ``malicious``: the client attacks this round (``adversary.behaviour``): it trains on what its
        behaviour's data hook makes of its training split (``data`` behaviours), or trains honestly
        and uploads what its behaviour makes of its own update (``own`` behaviours); colluding
        behaviours are crafted by the driver after collection.
        """
        self._load(global_adapter, state)
        data = self.data(client_id).train
        behaviour = BEHAVIOURS.get(self.cfg.adversary.behaviour) if malicious else None
        if behaviour is not None:
            data = poisoned_data(data, self.cfg, round_index, client_id)
        metrics = adversarial_round(
            self.model,
            data,
            self.algorithm.objective(data),
            self.cfg.train,
            seed=derive_seed(self.cfg.runtime.seed, "train", round_index, client_id),
            device=self.device,
            global_shared=global_adapter,
            precision=self.cfg.runtime.precision,
        )
        new_state = ClientState(personal=self.scope.personal(self.model), rounds_trained=state.rounds_trained + 1)
        upload = self.scope.shared(self.model)
        if behaviour is not None and behaviour.kind == OWN:
            context = attack_context(self.cfg, round_index, client_id)
            upload = craft_own_upload(upload, global_adapter, self.cfg.adversary, context)
        return ClientUpdate(client_id, upload, len(data), metrics, new_state)

    def evaluate(
        self,
        client_id: int,
        state: ClientState,
        adapter: Mapping[str, torch.Tensor],
        protocol: bool = False,
        transfer: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> EvalResult:
        """The client's personalised model (given shared tensors + its personal ones) on its own test split;
        ``GLOBAL_TEST_CLIENT`` scores the given (global) model on the global test set.
        ``protocol``: the final-model protocol (AutoAttack + gradient-masking checks) as well;
        ``transfer``: images crafted on other models for it to score (``engine.transfer``)."""
        self._load(adapter, state)
        data = self.global_test() if client_id == GLOBAL_TEST_CLIENT else self.data(client_id).test
        return evaluate(
            self.model,
            data,
            self.cfg.attack,
            self.cfg.train.eval_batch_size,
            seed=derive_seed(self.cfg.runtime.seed, "eval", "global" if client_id == GLOBAL_TEST_CLIENT else client_id),
            device=self.device,
            protocol=self.cfg.evaluation if protocol else None,
            transfer=transfer,
        )

    # --- transfer sources --------------------------------------------------------------------------
    def source_model(
        self,
        source: "TransferSource",
        models: "FinalModels",
        adapter: Mapping[str, torch.Tensor],
        adapter_key: str,
        tailored: bool,
    ) -> tuple[nn.Module, str]:
        """A transfer source's model on this worker, and what it is (``transfer.csv``'s
        ``source_detail``). ``tailored``: the final models are Phase 2's (each on its fused model),
        else Phase 1's (this worker's model with the participant's personal tensors loaded)."""
        if source.kind == "public":
            return self.public_model(source.attacker)
        attacker = int(source.attacker)  # type: ignore[arg-type]
        state = ClientState(personal=models.personal_of(attacker))
        if not tailored:
            self._load(adapter, state)
            what = "the global adapter with" if source.kind == "global" else "the final model:"
            return self.model, f"client {attacker}'s Phase-1 {what} its personal tensors"
        game = self.game(attacker, state, adapter, adapter_key)
        if source.kind == "global":
            return game.load_tailored({}), f"the merged global adapter with client {attacker}'s Phase-1 head"
        tuned = models.tuned.get(attacker, {})
        return game.load_tailored(tuned), f"client {attacker}'s final model (Phase 2: tailored layers + head)"

    def public_model(self, attacker: Optional[int]) -> tuple[nn.Module, str]:
        """The pre-trained model anyone can download, with a head an outsider has: the embedded
        pre-training's own head; for hub, checkpoint or random weights a linear head fit on the data
        source's public share, or, where there is none, on the attacking participant's train split."""
        cfg = self.cfg
        if self._public is None:
            self._public = build_pretrained_model(cfg.model, cfg.data, self.source, self._backbone_state)
            self._public.to(self.device).eval()
        if cfg.model.pretrained == "embedded":
            return self._public, "the pre-trained model and its pre-training head (public share)"
        public = self.source.public
        key = None if public is not None and len(public) else attacker
        if key is None and (public is None or not len(public)):
            raise ValueError(
                "evaluation.transfer=public: the data has no public share (data.public_fraction=0) and there is no "
                "other participant to fit the public model's head on; add a public share or drop 'public'"
            )
        if key not in self._public_heads:
            head = self._public.backbone.get_classifier()
            if not isinstance(head, nn.Linear):
                raise ValueError(
                    f"evaluation.transfer=public fits a linear head; {cfg.model.name}'s classifier is "
                    f"{type(head).__name__}: drop 'public' from evaluation.transfer"
                )
            data = public if key is None else self.data(int(key)).train
            where = "the public share" if key is None else f"client {key}'s train split"
            where += f" ({len(data)} images)"
            state = fit_linear_head(self._public, head, data, cfg.train.eval_batch_size, self.device)
            self._public_heads[key] = (state, f"the pre-trained backbone with a linear head fit on {where}")
        state, detail = self._public_heads[key]
        self._public.backbone.get_classifier().load_state_dict(state)
        return self._public, detail

    # --- Phase 2 ---------------------------------------------------------------------------------
    def game(
        self, client_id: int, state: ClientState, adapter: Mapping[str, torch.Tensor], adapter_key: str
    ) -> "LayerGame":
        """The client's layer game on its fused model, built once per (client, global adapter).

        Games are kept (most recently used last) while their fused models and host copies of the
        reference weights fit in ``layer_selection.game_cache_mb``; the driver sends a client's
        coalitions to one actor, so a game is normally built once per client in the whole pool.
        """
        key = (client_id, adapter_key)
        if key not in self._games:
            if self.scope.name != "lora":
                raise ValueError(
                    f"Phase 2 merges the global LoRA adapter; algorithm {self.algorithm.name!r} (scope "
                    f"{self.scope.name!r}) shares none: set layer_selection.enabled=false"
                )
            fused = fuse(self.model, adapter, state.personal)
            self._games[key] = LayerGame(self.cfg, fused, self.data(client_id).train, client_id, self.device)
            budget = self.cfg.layer_selection.game_cache_mb * BYTES_PER_MB
            while len(self._games) > 1 and sum(g.footprint_bytes for g in self._games.values()) > budget:
                self._games.popitem(last=False)
        self._games.move_to_end(key)
        return self._games[key]

    def player_names(self) -> list[str]:
        fused = fuse(self.model, self.initial_adapter, self.initial_personal)
        return player_prefixes(fused, self.cfg.layer_selection.players, self.cfg.lora.target_modules)
