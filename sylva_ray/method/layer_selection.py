"""Sylva's Phase 2 on one client, Ray-free: fuse the global LoRA, play the layer game, tailor.

1. *Fusion*: load the final global adapter and the client's head into the worker's peft model and
   merge (peft ``merge_and_unload``) into a plain model: the client's starting point.
2. *The game*: players are the model's layers (``blocks``: the transformer blocks; ``modules``:
   the LoRA-adapted linear layers). The value of a coalition S is measured by fine-tuning only the
   layers in S plus the head on the client's benign *fit* split for ``coalition_steps`` steps,
   starting every time from the same fused weights with the same seed, then scoring on its held-out
   *validation* split with the same fixed adversarial start (common random numbers). The default
   value is continuous, ``-(CE_benign + lambda * CE_adversarial)``: accuracy on a validation share of
   ~15 images moves in whole images, so most coalitions of an accuracy-valued game tie (docs
   explanation/method.md); ``clean + lambda * robust`` accuracy and the tolerance form remain. v(empty) is the
   fused model with only its head tuned.
3. *Tailoring*: the selected layers plus the head are fine-tuned on the client's whole benign train
   split for ``finetune_steps``; the tuned tensors go back to the driver, and the final-model
   protocol scores the result on the test split (``evaluate_tailored``), as a job of its own that
   any worker can run.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from sylva_ray.base.config import ExperimentConfig, LayerSelectionConfig
from sylva_ray.base.seeding import derive_seed, numpy_rng
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.evaluation import EvalResult, evaluate
from sylva_ray.method.models import classifier_name, load_adapter_state
from sylva_ray.method.shapley import mask_members
from sylva_ray.method.training import benign_finetune

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
    clean_loss: float
    robust_loss: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def coalition_value(sel: LayerSelectionConfig, scored: Mapping[str, float], reference_robust: float) -> float:
    """v(S) from a coalition's validation figures, by ``layer_selection.value`` (module docstring)."""
    if sel.value == "ce":
        return -(scored["clean_loss"] + sel.robust_weight * scored["robust_loss"])
    if sel.value == "linear":
        return scored["clean_acc"] + sel.robust_weight * scored["robust_acc"]
    drop = reference_robust - scored["robust_acc"]
    return scored["clean_acc"] - sel.robust_penalty * max(0.0, drop - sel.robust_tolerance)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
        #: What keeping this game costs: the model being tuned (on the device) and its reference
        #: weights (in host memory); both count against ``layer_selection.game_cache_mb``.
        self.footprint_bytes = _nbytes(fused.state_dict().values()) + _nbytes(self.fused_state.values())
        self.fit, self.validation = split_validation(
            train, self.sel.validation_fraction, derive_seed(cfg.runtime.seed, "phase2", client_id)
        )
        self.train = train
        self.seed = derive_seed(cfg.runtime.seed, "phase2-game", client_id)
        self._reference: EvalResult | None = None

    @property
    def reference(self) -> EvalResult:
        """The fused model untouched (the robustness Phase 1 bought): the tolerance value's baseline."""
        if self._reference is None:
            self.model.load_state_dict(self.fused_state)
            self._reference = self._score()
        return self._reference

    def _score(self) -> EvalResult:
        return evaluate(
            self.model,
            self.validation,
            self.cfg.attack,
            self.cfg.train.eval_batch_size,
            seed=self.seed,
            device=self.device,
        )

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
        reference_robust = self.reference.robust_acc if self.sel.value == "tolerance" else float("nan")
        self._tune(mask_members(mask, len(self.players)), self.fit, self.sel.coalition_steps)
        result = self._score()
        figures = {
            "clean_acc": result.clean_acc,
            "robust_acc": result.robust_acc,
            "clean_loss": float(result.clean_loss or 0.0),
            "robust_loss": float(result.robust_loss or 0.0),
        }
        return CoalitionValue(coalition_value(self.sel, figures, reference_robust), **figures)

    def tailor(self, players: list[int] | None) -> dict[str, torch.Tensor]:
        """Fine-tune the chosen layers + head on the whole train split (``None``: no tuning at all).

        Returns the tuned tensors (chosen layers + head): with the global adapter they reproduce the
        tailored model, and ``evaluate_tailored`` scores them on any worker.
        """
        if players is None:
            self.model.load_state_dict(self.fused_state)
        else:
            self._tune(players, self.train, self.sel.finetune_steps)
        head = classifier_prefix(self.model)
        chosen = [self.players[p] for p in players or []]
        return {
            k: v.detach().cpu().clone()
            for k, v in self.model.state_dict().items()
            if k.startswith(head) or any(k.startswith(prefix) for prefix in chosen)
        }

    def load_tailored(self, tuned: State) -> nn.Module:
        """The fused model with ``tuned`` (tailored layers + head) loaded: the client's final model."""
        self.model.load_state_dict(self.fused_state)
        self.model.load_state_dict(dict(tuned), strict=False)
        return self.model

    def evaluate_tailored(
        self,
        tuned: State,
        test: ArrayDataset,
        on_stage: Optional[Callable[[str], None]] = None,
        transfer: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> EvalResult:
        """The final-model protocol on the test split for the fused model with ``tuned`` loaded
        (``on_stage``: told which attack starts, for a progress bar; ``transfer``: images crafted
        on other models for it to score, ``evaluation.evaluate``)."""
        return evaluate(
            self.load_tailored(tuned),
            test,
            self.cfg.attack,
            self.cfg.train.eval_batch_size,
            seed=derive_seed(self.cfg.runtime.seed, "eval", self.client_id),
            device=self.device,
            protocol=self.cfg.evaluation,
            on_stage=on_stage,
            transfer=transfer,
        )


def classifier_prefix(model: nn.Module) -> str:
    return classifier_name(model) + "."
