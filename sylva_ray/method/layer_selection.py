"""Sylva's Phase 2 on one client, Ray-free: fuse the global LoRA, play the layer game, tailor.

1. *Fusion*: load the final global adapter and the client's head into the worker's peft model and
   merge (peft ``merge_and_unload``) into a plain model: the client's starting point.
2. *The game*: players are the model's layers (``blocks``: the transformer blocks; ``modules``:
   the LoRA-adapted linear layers). The value of a coalition S is measured by fine-tuning only the
   layers in S plus the head on the client's benign *fit* split for ``coalition_steps`` steps,
   starting every time from the same fused weights with the same seed, then scoring on its held-out
   *validation* split with the same fixed adversarial start (common random numbers):
   ``clean + lambda * robust`` (or the tolerance form). v(empty) is the fused model with only its
   head tuned.
3. *Tailoring*: the selected layers plus the head are fine-tuned on the client's whole benign train
   split for ``finetune_steps`` and the result is scored on its test split, clean and robust.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from sylva_ray.base.config import ExperimentConfig, LayerSelectionConfig
from sylva_ray.base.seeding import derive_seed, numpy_rng
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.models import classifier_name, load_adapter_state
from sylva_ray.method.shapley import mask_members
from sylva_ray.method.training import EvalResult, benign_finetune, evaluate

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


def player_prefixes(model: nn.Module, granularity: str, lora_targets: list[str]) -> list[str]:
    """Parameter-name prefixes, one per player, in model order (``backbone.blocks.3.`` ...)."""
    backbone = model.backbone
    if granularity == "blocks":
        for container in ("blocks", "stages", "layers"):
            if isinstance(getattr(backbone, container, None), nn.Sequential | nn.ModuleList):
                return [f"backbone.{container}.{i}." for i in range(len(getattr(backbone, container)))]
        raise ValueError("layer_selection.players='blocks' needs a timm model with blocks/stages/layers; use 'modules'")
    names = [name for name, _ in model.named_modules() if any(name.endswith("." + t) for t in lora_targets)]
    return [f"{name}." for name in names]


def split_validation(data: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Seeded fit/validation split of a client's train split (each at least one sample)."""
    order = numpy_rng(seed, "validation").permutation(len(data))
    n_val = min(max(1, int(round(fraction * len(data)))), len(data) - 1)
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def fuse(peft_model: nn.Module, adapter: State, head: State) -> nn.Module:
    """The client's fused model: a merged copy; the worker's peft model is left as it was."""
    load_adapter_state(peft_model, {**adapter, **head})
    return copy.deepcopy(peft_model).merge_and_unload().eval()


@dataclass
class CoalitionValue:
    value: float
    clean_acc: float
    robust_acc: float


class LayerGame:
    """One client's game on one fused model: every coalition starts from the same weights and seed."""

    def __init__(
        self, cfg: ExperimentConfig, fused: nn.Module, train: ArrayDataset, client_id: int, device: torch.device
    ) -> None:
        self.cfg = cfg
        self.sel: LayerSelectionConfig = cfg.layer_selection
        self.model = fused
        self.device = device
        self.client_id = client_id
        self.players = player_prefixes(fused, self.sel.players, cfg.lora.target_modules)
        # The reference weights every coalition restarts from stay in host memory: on a GPU only the
        # model being tuned occupies the card (one ViT-B copy, not two, per game).
        self.fused_state = {k: v.detach().to("cpu", copy=True) for k, v in fused.state_dict().items()}
        self.device_bytes = sum(t.numel() * t.element_size() for t in fused.state_dict().values())
        self.fit, self.validation = split_validation(
            train, self.sel.validation_fraction, derive_seed(cfg.runtime.seed, "phase2", client_id)
        )
        self.train = train
        self.seed = derive_seed(cfg.runtime.seed, "phase2-game", client_id)
        self.reference = self._score()  # the fused model untouched: the robustness Phase 1 bought

    def _score(self) -> EvalResult:
        return evaluate(
            self.model,
            self.validation,
            self.cfg.attack,
            self.cfg.train.eval_batch_size,
            seed=self.seed,
            device=self.device,
        )

    def _value(self, result: EvalResult) -> float:
        if self.sel.value == "linear":
            return result.clean_acc + self.sel.robust_weight * result.robust_acc
        drop = self.reference.robust_acc - result.robust_acc
        return result.clean_acc - self.sel.robust_penalty * max(0.0, drop - self.sel.robust_tolerance)

    def _tune(self, players: list[int], data: ArrayDataset, steps: int) -> None:
        self.model.load_state_dict(self.fused_state)
        benign_finetune(
            self.model,
            data,
            [self.players[p] for p in players],
            self.cfg.train,
            lr=self.sel.finetune_lr,
            steps=steps,
            seed=self.seed,
            device=self.device,
            precision=self.cfg.runtime.precision,
        )

    def value(self, mask: int) -> CoalitionValue:
        """v(S): tune S + head on the fit split, score on the validation split."""
        self._tune(mask_members(mask, len(self.players)), self.fit, self.sel.coalition_steps)
        result = self._score()
        return CoalitionValue(self._value(result), result.clean_acc, result.robust_acc)

    def tailor(self, players: list[int], test: ArrayDataset) -> tuple[EvalResult, dict[str, torch.Tensor]]:
        """Fine-tune the chosen layers + head on the whole train split; score on the test split.

        Returns the test result and the tuned tensors (chosen layers + head): with the global
        adapter they reproduce the tailored model.
        """
        self._tune(players, self.train, self.sel.finetune_steps)
        result = evaluate(
            self.model,
            test,
            self.cfg.attack,
            self.cfg.train.eval_batch_size,
            seed=derive_seed(self.cfg.runtime.seed, "eval", self.client_id),
            device=self.device,
            protocol=self.cfg.evaluation,
        )  # the tailored model is the final one: full protocol
        head = classifier_prefix(self.model)
        tuned = {
            k: v.detach().cpu().clone()
            for k, v in self.model.state_dict().items()
            if k.startswith(head) or any(k.startswith(self.players[p]) for p in players)
        }
        return result, tuned


def classifier_prefix(model: nn.Module) -> str:
    return classifier_name(model) + "."
