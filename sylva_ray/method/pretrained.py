"""Where the pre-trained backbone's weights come from (``model.pretrained``), and their identity.

  embedded   -- clean pre-training on the public slice, once, cached by what determines it;
  timm       -- timm's hub weights (``create_backbone``);
  checkpoint -- a local safetensors or torch file, never unpickled unsafely (``read_checkpoint``);
  none       -- the seeded random init (``models.seeded_create``).

The driver resolves the weights once (``pretrained_backbone_state``) and every actor builds the
same model from them (``build_pretrained_model``); ``state_digest`` names a set of weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Mapping, Optional

import filelock
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from sylva_ray.base.config import DataConfig, ModelConfig
from sylva_ray.base.seeding import derive_seed, torch_generator, torch_seeded
from sylva_ray.base.storage import atomic_write_bytes, default_cache_dir
from sylva_ray.method.data import ArrayDataset, DataSource
from sylva_ray.method.models import PixelSpaceModel, classifier_name, pixel_space_model, seeded_create, timm_library
from sylva_ray.method.wire import damaged_file_message

log = logging.getLogger(__name__)

#: Bumped whenever the embedded pre-training recipe changes, so stale cache entries are not reused.
PRETRAIN_RECIPE_VERSION = 3
#: Embedded pre-training always runs on this many torch threads: CPU float reductions depend on the
#: thread count, and 100 epochs amplify the difference, so the cached weights would otherwise depend
#: on which process (main, or a Ray actor with OMP_NUM_THREADS=1) trained them first.
PRETRAIN_THREADS = 1


class ModelSourceError(RuntimeError):
    """Pre-trained weights cannot be had from the configured source; the message says what to do."""


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
        model = pixel_space_model(backbone, model_cfg)
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
        return pixel_space_model(backbone, model_cfg).eval()
    backbone = create_backbone(model_cfg, source.num_classes)
    if model_cfg.pretrained == "checkpoint":
        load_backbone_weights(
            backbone, read_checkpoint(model_cfg.checkpoint), f"model.checkpoint={model_cfg.checkpoint!r}"
        )
    elif model_cfg.pretrained == "embedded":
        load_backbone_weights(backbone, embedded_weights(model_cfg, data_cfg, source), "embedded pre-training")
    return pixel_space_model(backbone, model_cfg).eval()


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
