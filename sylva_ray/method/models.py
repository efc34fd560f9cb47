"""timm backbone + normalisation inside the model + peft LoRA, and which tensors play which role.

Why normalisation lives inside the model: torchattacks expects inputs in [0, 1] and measures eps
there. ``PixelSpaceModel`` takes data-space images (8x8 digits, 32x32 CIFAR), resizes them to the
backbone's input size and normalises, so an attack's eps is always in the data's own pixel space
and nobody calls ``set_normalization_used`` (docs explanation/method.md 'Pitfalls the code guards against', 2).

Roles of parameters (``parameter_roles``):
  shared   -- LoRA factors: uploaded, aggregated, broadcast;
  personal -- the classifier head (peft ``modules_to_save``): trained, never leaves the client;
  frozen   -- everything else (the pre-trained backbone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import filelock
import torch
import torch.nn.functional as F
from safetensors.torch import load, load_file, save
from torch import nn
from tqdm.auto import tqdm

from sylva_ray.base.config import ConfigError, DataConfig, LoRAConfig, ModelConfig
from sylva_ray.base.seeding import derive_seed, torch_generator, torch_seeded
from sylva_ray.base.storage import atomic_write_bytes, default_cache_dir
from sylva_ray.method.data import ArrayDataset, DataSource

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


log = logging.getLogger(__name__)

#: Bumped whenever the embedded pre-training recipe changes, so stale cache entries are not reused.
PRETRAIN_RECIPE_VERSION = 3
#: Embedded pre-training always runs on this many torch threads: CPU float reductions depend on the
#: thread count, and 100 epochs amplify the difference, so the cached weights would otherwise depend
#: on which process (main, or a Ray actor with OMP_NUM_THREADS=1) trained them first.
PRETRAIN_THREADS = 1
#: Module types that LoRA may adapt here; a match on anything else (e.g. patch_embed's Conv2d) is refused.
LORA_TARGET_TYPES = (nn.Linear,)


class ModelSourceError(RuntimeError):
    """Pre-trained weights cannot be had from the configured source; the message says what to do."""


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


def create_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` by name, seeded init; hub weights only when ``pretrained == 'timm'``."""
    if cfg.name not in timm_library().list_models():
        raise ModelSourceError(f"model.name={cfg.name!r} is not a timm model (see timm.list_models())")
    try:
        return seeded_create(cfg.name, num_classes, cfg.kwargs, pretrained=cfg.pretrained == "timm")
    except (OSError, RuntimeError) as exc:
        if cfg.pretrained != "timm":
            raise
        raise ModelSourceError(
            f"model.pretrained='timm': could not fetch weights for {cfg.name!r} from the hub ({type(exc).__name__}). "
            "Offline, download them elsewhere and use --set model.pretrained=checkpoint "
            "--set model.checkpoint=/path/model.safetensors (HF_HUB_OFFLINE=1 makes this check fail fast)"
        ) from exc


def _pixel_model(backbone: nn.Module, cfg: ModelConfig) -> PixelSpaceModel:
    pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = list(cfg.mean) if cfg.mean is not None else list(pcfg.get("mean", (0.5, 0.5, 0.5)))
    std = list(cfg.std) if cfg.std is not None else list(pcfg.get("std", (0.5, 0.5, 0.5)))
    input_size = tuple(pcfg.get("input_size", (3, 224, 224))[-2:])
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        input_size = tuple(patch_embed.img_size)  # kwargs such as img_size=32 override the default cfg
    return PixelSpaceModel(backbone, input_size, mean, std)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch file loaded with ``weights_only=True`` (never arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"model.checkpoint={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zipfile, pickle and torch each raise their own kinds for a bad file
        raise ModelSourceError(damaged_file_message(f"model.checkpoint={str(path)!r}", exc)) from None
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper_key in state and isinstance(state[wrapper_key], dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise ModelSourceError(f"model.checkpoint={str(path)!r} does not hold a state dict")
    return state


def damaged_file_message(what: str, exc: BaseException) -> str:
    """``what`` is not a readable weight/checkpoint file: say so, with the reader's first line, and
    never pass on torch's advice to retry with ``weights_only=False`` (that would run the file's code)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        detail = "it refers to Python objects a weight file never holds (it could run code if loaded unsafely)"
    return f"{what}: damaged or not a weight file ({type(exc).__name__}: {detail[:200]}); it is never loaded unsafely"


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load a backbone state dict; a classifier of another size is dropped and re-initialised.

    Any other missing or unexpected key is an error: silently training from random weights
    would void the pre-trained premise of the whole study.
    """
    own = backbone.state_dict()
    head_prefix = classifier_name(backbone) + "."
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    dropped = [k for k, v in state.items() if k.startswith(head_prefix) and (k not in own or own[k].shape != v.shape)]
    filtered = {k: v for k, v in state.items() if k not in dropped}
    result = backbone.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise ModelSourceError(
            f"{origin}: weights do not fit the model (missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}); "
            "check model.name and model.kwargs"
        )
    if dropped:
        log.info(
            "%s: classifier %s re-initialised for %d classes",
            origin,
            head_prefix.rstrip("."),
            backbone.get_classifier().out_features,
        )


def embedded_cache_key(model_cfg: ModelConfig, data_cfg: DataConfig, num_classes: int) -> str:
    """Everything that determines the embedded pre-trained weights, hashed."""
    ident = {
        "recipe": PRETRAIN_RECIPE_VERSION,
        "model": {k: v for k, v in asdict(model_cfg).items() if k not in {"cache_dir", "checkpoint", "pretrained"}},
        "num_classes": num_classes,
        "data": {
            k: getattr(data_cfg, k)
            for k in (
                "name",
                "public_fraction",
                "public_seed",
                "synthetic_num_samples",
                "synthetic_num_classes",
                "synthetic_image_size",
            )
        },
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block on ``count`` torch threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_on_public(model: PixelSpaceModel, public: ArrayDataset, cfg: ModelConfig, seed: int) -> None:
    """Clean full-model pre-training on the public slice: AdamW + cosine schedule, in place."""
    device = next(model.parameters()).device
    images = public.pixels()  # the public slice is small: converted once
    labels = torch.from_numpy(public.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay)
    steps_per_epoch = max(1, -(-len(labels) // cfg.pretrain_batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.pretrain_epochs * steps_per_epoch)
    generator = torch_generator(seed)
    model.train()
    with torch_threads(PRETRAIN_THREADS), torch_seeded(seed):
        for _ in tqdm(range(cfg.pretrain_epochs), desc="pre-training on the public slice", leave=False):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), cfg.pretrain_batch_size):
                idx = order[start : start + cfg.pretrain_batch_size]
                loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    model.eval()


def embedded_weights(
    model_cfg: ModelConfig, data_cfg: DataConfig, source: DataSource, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Pre-train on the public slice once; later calls (any process) reuse the cached file.

    A file lock keeps two actors or Tune trials from pre-training the same model twice; the file is
    written atomically so a crash never leaves a truncated cache entry.
    """
    if source.public is None or len(source.public) == 0:
        raise ModelSourceError("model.pretrained='embedded' needs a public slice: set data.public_fraction > 0")
    cache_dir = Path(model_cfg.cache_dir) if model_cfg.cache_dir else default_cache_dir()
    key = embedded_cache_key(model_cfg, data_cfg, source.num_classes)
    path = cache_dir / "pretrained" / f"{model_cfg.name}-{data_cfg.name}-{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if path.is_file():
            log.info("embedded pre-trained weights: reusing %s", path)
            return load_file(str(path))
        backbone = seeded_create(model_cfg.name, source.num_classes, model_cfg.kwargs, seed=seed)
        model = _pixel_model(backbone, model_cfg)
        log.info(
            "embedded pre-training %s on %d public samples for %d epochs",
            model_cfg.name,
            len(source.public),
            model_cfg.pretrain_epochs,
        )
        pretrain_on_public(model, source.public, model_cfg, derive_seed(seed, "pretrain"))
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
        atomic_write_bytes(path, save(state))
        log.info("embedded pre-trained weights cached at %s", path)
        return state


def build_pretrained_model(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    source: DataSource,
    backbone_state: Optional[Mapping[str, torch.Tensor]] = None,
) -> PixelSpaceModel:
    """The pre-trained model in pixel space, before any adapter: the same for every client.

    With ``backbone_state`` (weights the driver resolved once and shared through the object store)
    no hub, file or cache is touched here, so client actors on other nodes need none of them.
    """
    if backbone_state is not None:
        backbone = seeded_create(model_cfg.name, source.num_classes, model_cfg.kwargs)
        load_backbone_weights(backbone, backbone_state, "driver-resolved weights")
        return _pixel_model(backbone, model_cfg).eval()
    backbone = create_backbone(model_cfg, source.num_classes)
    if model_cfg.pretrained == "checkpoint":
        load_backbone_weights(
            backbone, read_checkpoint(model_cfg.checkpoint), f"model.checkpoint={model_cfg.checkpoint!r}"
        )
    elif model_cfg.pretrained == "embedded":
        load_backbone_weights(backbone, embedded_weights(model_cfg, data_cfg, source), "embedded pre-training")
    return _pixel_model(backbone, model_cfg).eval()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes: the identity of a set of weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def pretrained_backbone_state(
    model_cfg: ModelConfig, data_cfg: DataConfig, source: DataSource
) -> dict[str, torch.Tensor]:
    """The pre-trained backbone's weights as CPU tensors: resolved once where a run starts, then
    shared with every actor (``build_pretrained_model(..., backbone_state=...)``)."""
    base = build_pretrained_model(model_cfg, data_cfg, source)
    return {k: v.detach().cpu() for k, v in base.backbone.state_dict().items()}


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


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def shared_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA factors only (peft's adapter channel, without the head): what is uploaded."""
    from peft import get_peft_model_state_dict

    return _cpu_copy({k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k})


def personal_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The classifier head (peft's ``modules_to_save`` copy): what stays on the client."""
    from peft import get_peft_model_state_dict

    return _cpu_copy({k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_" not in k})


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


def serialized_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict as actually serialised (safetensors: raw tensors + a JSON header)."""
    return len(encode_state(state))


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """The wire format of an adapter payload: safetensors bytes, so counted bytes = shipped bytes.
    A state without tensors is nothing on the wire (``b""``): a client that shares nothing sends nothing."""
    return save(_cpu_copy(state)) if state else b""


def decode_state(payload: bytes) -> dict[str, torch.Tensor]:
    return load(payload) if payload else {}


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
