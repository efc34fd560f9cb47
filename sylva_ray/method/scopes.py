"""What a client trains, uploads and keeps: the LoRA scope (Sylva), the full-model scope (FAT), or
the local scope (every client alone).

    lora:  peft LoRA on the frozen backbone; the factors are shared (uploaded), the head personal.
    full:  the whole pre-trained model is trainable and shared; nothing is personal, so the
           aggregate is a complete *global model* (the FAT papers' object, scored on a global test set).
    local: peft LoRA as in ``lora``, but nothing is shared: factors and head are both personal, so
           nothing is uploaded, downloaded or aggregated (an empty state costs no bytes).

Both start from the same pre-trained weights, and both uploads are safetensors bytes of a state
dict (``wire.encode_state``), so communication is counted the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

from sylva_ray.base.config import LoRAConfig
from sylva_ray.base.registry import Registry

if TYPE_CHECKING:  # the model code (torch, peft) loads where a model is built: naming a scope needs none
    import torch
    from torch import nn

    from sylva_ray.method.models import PixelSpaceModel

State = dict[str, "torch.Tensor"]


class ModelScope(Protocol):
    name: str
    #: The shared tensors form one complete model every client holds (scored on a global test set).
    global_form: bool

    def wrap(self, base: PixelSpaceModel, lora: LoRAConfig) -> nn.Module: ...
    def shared(self, model: nn.Module) -> State: ...
    def personal(self, model: nn.Module) -> State: ...
    def load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None: ...


class LoRAScope:
    name = "lora"
    global_form = False

    def wrap(self, base: PixelSpaceModel, lora: LoRAConfig) -> nn.Module:
        from sylva_ray.method.models import add_lora

        return add_lora(base, lora)

    def shared(self, model: nn.Module) -> State:
        from sylva_ray.method.models import shared_state

        return shared_state(model)  # type: ignore[arg-type]

    def personal(self, model: nn.Module) -> State:
        from sylva_ray.method.models import personal_state

        return personal_state(model)  # type: ignore[arg-type]

    def load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        from sylva_ray.method.models import load_adapter_state

        load_adapter_state(model, state)  # type: ignore[arg-type]


class FullScope:
    name = "full"
    global_form = True

    def wrap(self, base: PixelSpaceModel, lora: LoRAConfig) -> nn.Module:
        return base.requires_grad_(True)

    def shared(self, model: nn.Module) -> State:
        """Every tensor of the model (parameters and buffers): what full-model FAT uploads."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}

    def personal(self, model: nn.Module) -> State:
        return {}

    def load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Strict: a full-model payload must hold every tensor of the model and nothing else."""
        if not state:
            return
        model.load_state_dict(dict(state), strict=True)


class LocalScope(LoRAScope):
    """LoRA trained alone: the factors stay with the client, next to its head."""

    name = "local"

    def shared(self, model: nn.Module) -> State:
        return {}

    def personal(self, model: nn.Module) -> State:
        from sylva_ray.method.models import personal_state, shared_state

        return {**shared_state(model), **personal_state(model)}  # type: ignore[arg-type]


SCOPES: Registry[ModelScope] = Registry("scope")
SCOPES.add("lora", LoRAScope())
SCOPES.add("full", FullScope())
SCOPES.add("local", LocalScope())
