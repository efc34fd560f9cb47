"""timm backbone + normalisation inside the model + peft LoRA, and which tensors play which role.

Why normalisation lives inside the model: torchattacks expects inputs in [0, 1] and measures eps
there. ``PixelSpaceModel`` takes data-space images (8x8 digits, 32x32 CIFAR), resizes them to the
backbone's input size and normalises, so an attack's eps is always in the data's own pixel space
and nobody calls ``set_normalization_used`` (docs explanation/method.md 'Pitfalls the code guards against', 2).

Roles of parameters (``parameter_roles``):
  shared   -- LoRA factors: uploaded, aggregated, broadcast;
  personal -- the classifier head (peft ``modules_to_save``): trained, never leaves the client;
  frozen   -- everything else (the pre-trained backbone).

Where the backbone's weights come from is ``method.pretrained``; how state dicts travel, ``method.wire``.
"""

from __future__ import annotations

import sys
from enum import Enum
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sylva_ray.base.config import ConfigError, LoRAConfig, ModelConfig
from sylva_ray.base.seeding import derive_seed, torch_seeded
from sylva_ray.method.wire import cpu_copy, serialized_nbytes

if TYPE_CHECKING:
    from peft import PeftModel


def timm_library() -> ModuleType:
    """timm, with this package's models registered, imported at first use.

    timm (with torchvision) and peft (with transformers) cost seconds of CPU and hundreds of MB in
    every process that imports them; a driver actor or a launching process that builds no trainable
    model never needs them, so nothing in this module imports them until a model is built.
    """
    import timm

    import sylva_ray.method.timm_models  # noqa: F401  (registers vit_pico_patch4_16 with timm)

    return timm


def is_peft_model(model: nn.Module) -> bool:
    """``isinstance(model, peft.PeftModel)`` without importing peft where no model was wrapped."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


#: Module types that LoRA may adapt here; a match on anything else (e.g. patch_embed's Conv2d) is refused.
LORA_TARGET_TYPES = (nn.Linear,)


class Role(str, Enum):
    SHARED = "shared"
    PERSONAL = "personal"
    FROZEN = "frozen"


class PixelSpaceModel(nn.Module):
    """``[0,1]`` images of any size -> resize to the backbone's input -> normalise -> backbone."""

    def __init__(self, backbone: nn.Module, input_size: tuple[int, int], mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = tuple(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            if images.is_cuda and torch.are_deterministic_algorithms_enabled():
                images = bilinear_resize_by_matmul(
                    images, self.input_size
                )  # CUDA's upsample backward is not deterministic
            else:
                images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        return self.backbone((images - self.mean) / self.std)


def linear_resize_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``W`` (size_out x size_in) with ``W @ x`` = torch's 1-D linear resize (align_corners=False).

    Built by resizing the identity with torch itself, so it matches ``F.interpolate`` by construction.
    """
    eye = torch.eye(size_in, device=device, dtype=dtype).unsqueeze(0)  # channel c holds the basis vector e_c
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


def bilinear_resize_by_matmul(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) as ``W_h @ images @ W_w^T``: the same map as
    ``F.interpolate``, but its backward is two matmuls, deterministic under cuBLAS's fixed workspace."""
    dtype = torch.promote_types(images.dtype, torch.float32)  # in fp32 even under autocast, as F.interpolate
    with torch.autocast(device_type=images.device.type, enabled=False):
        rows = linear_resize_matrix(images.shape[-2], size[0], images.device, dtype)
        cols = linear_resize_matrix(images.shape[-1], size[1], images.device, dtype)
        return rows @ images.to(dtype) @ cols.T


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the classifier module (timm's ``get_classifier``), e.g. ``backbone.head``."""
    backbone = model.backbone if isinstance(model, PixelSpaceModel) else model
    head = backbone.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError("the model's classifier is not one of its submodules")


def seeded_create(
    name: str, num_classes: int, kwargs: Mapping[str, Any], pretrained: bool = False, seed: int = 0
) -> nn.Module:
    """``timm.create_model`` with its random initialisation drawn from ``seed``.

    torch's default generator is seeded differently in every process, so an unseeded init (of the
    whole model, or of a re-initialised head) would differ between runs, actors and machines.
    """
    with torch_seeded(derive_seed(seed, "init")):
        return timm_library().create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def pixel_space_model(backbone: nn.Module, cfg: ModelConfig) -> PixelSpaceModel:
    """``backbone`` in pixel space: the config's mean/std where set, else the backbone's own, and its input size."""
    pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = list(cfg.mean) if cfg.mean is not None else list(pcfg.get("mean", (0.5, 0.5, 0.5)))
    std = list(cfg.std) if cfg.std is not None else list(pcfg.get("std", (0.5, 0.5, 0.5)))
    input_size = tuple(pcfg.get("input_size", (3, 224, 224))[-2:])
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        input_size = tuple(patch_embed.img_size)  # kwargs such as img_size=32 override the default cfg
    return PixelSpaceModel(backbone, input_size, mean, std)


def matched_modules(model: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    """What peft's suffix matching would pick for one ``target_modules`` entry."""
    return [(name, module) for name, module in model.named_modules() if name == target or name.endswith("." + target)]


def add_lora(model: PixelSpaceModel, cfg: LoRAConfig) -> PeftModel:
    """Wrap with peft LoRA: backbone frozen, LoRA factors + classifier head trainable.

    Each target must match at least one ``nn.Linear`` and nothing else: peft matches by suffix,
    so ``"proj"`` would also adapt timm's ``patch_embed.proj`` convolution (docs
    explanation/method.md, 'Pitfalls the code guards against', 3).
    """
    head = classifier_name(model)
    for target in cfg.target_modules:
        hits = matched_modules(model, target)
        if not hits:
            linear = sorted({n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora.target_modules entry {target!r} matches no module; Linear layers here: {linear[:12]}"
            )
        wrong = [f"{n} ({type(m).__name__})" for n, m in hits if not isinstance(m, LORA_TARGET_TYPES) or n == head]
        if wrong:
            raise ValueError(
                f"lora.target_modules entry {target!r} also matches {wrong}; qualify it (e.g. 'attn.proj')"
            )
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=[head],
    )
    return get_peft_model(model, peft_cfg)


def parameter_role(name: str) -> Role:
    """One rule for every algorithm: LoRA factors shared, the saved head personal, the rest frozen."""
    if ".lora_" in name:
        return Role.SHARED
    if ".modules_to_save." in name:
        return Role.PERSONAL
    return Role.FROZEN


def parameter_roles(model: nn.Module) -> dict[str, Role]:
    return {name: parameter_role(name) for name, _ in model.named_parameters()}


def shared_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA factors only (peft's adapter channel, without the head): what is uploaded."""
    from peft import get_peft_model_state_dict

    return cpu_copy({k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k})


def personal_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The classifier head (peft's ``modules_to_save`` copy): what stays on the client."""
    from peft import get_peft_model_state_dict

    return cpu_copy({k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_" not in k})


def _personal_keys(model: PeftModel) -> list[str]:
    return [
        name.replace(".modules_to_save.default.", ".")
        for name, _ in model.named_parameters()
        if parameter_role(name) is Role.PERSONAL
    ]


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load shared and/or personal tensors through peft; a key peft does not know is an error.

    peft's setter insists on every ``modules_to_save`` key, so a shared-only payload keeps the
    model's current head.
    """
    payload = dict(state)
    if any(key not in payload for key in _personal_keys(model)):
        payload = {**personal_state(model), **payload}
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, payload)
    if result.unexpected_keys:
        raise KeyError(f"adapter state has keys the model does not: {list(result.unexpected_keys)[:5]}")


def full_model_nbytes(model: nn.Module) -> int:
    """Bytes a full-model upload of this architecture costs, serialised the same way as adapters.

    Counted on the base model's own tensors (LoRA factors and peft's head copy excluded), i.e. what
    full-model FAT sends each round.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    state = {k: v for k, v in base.state_dict().items() if ".lora_" not in k and ".modules_to_save." not in k}
    return serialized_nbytes(
        {k.replace(".original_module", "").replace(".base_layer", ""): v for k, v in state.items()}
    )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per role (numbers for the docs and the bench, not assumptions)."""
    counts = {role.value: 0 for role in Role}
    for name, param in model.named_parameters():
        counts[parameter_role(name).value] += param.numel()
    return counts


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device='cuda' but no CUDA device is visible here: use runtime.device=auto or cpu, "
            "or give client actors a GPU share (runtime.client_resources.num_gpus) on a GPU cluster"
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
