"""The checks of a run that need torch: the model's shape, a weight file's content, CUDA here.

* the model is built on torch's ``meta`` device (no memory, no weights): its timm name and
  ``model.kwargs``, the LoRA targets it really has, ``lora.rank`` against the targeted layers'
  width, ``layer_selection.top_k`` against the players of the layer game, and under
  ``runtime.deterministic`` on a GPU, layers whose CUDA backward has no deterministic kernel;
* a weight file is read as the run will read it (damage is named, never "retry with
  weights_only=False");
* ``runtime.device=cuda`` for a run on this machine alone where torch sees no CUDA device.

The in-process engine calls ``model_side_problems`` directly (it holds torch anyway). The process
that launches a Ray run holds no torch -- torch, timm and peft would cost it ~600 MiB for the whole
run and seconds of CPU before the client actors can start -- so there they run in a short-lived
child, ``python -m sylva_ray.engine.model_checks``, while the launcher checks the data
(``engine.preflight.ModelChecks``): the config as a JSON argument, the problems as a JSON list on
stdout, exit status 0 whatever the verdict (anything else is a bug, with its traceback on stderr).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import torch
from torch import nn

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.method.layer_selection import player_prefixes
from sylva_ray.method.models import matched_modules, pixel_space_model, timm_library
from sylva_ray.method.pretrained import ModelSourceError, read_checkpoint

#: Layers whose CUDA backward torch has no deterministic kernel for: with
#: ``torch.use_deterministic_algorithms(True)`` their first backward on a GPU raises (torch docs,
#: ``use_deterministic_algorithms``). timm's CNN heads pool with ``nn.AdaptiveAvgPool2d``.
NONDETERMINISTIC_CUDA_BACKWARD = (
    nn.AvgPool3d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool2d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)
#: Classes used to build the meta model when the dataset's own count is not known without reading it.
META_NUM_CLASSES = 10


def model_side_problems(cfg: ExperimentConfig, cuda_here: bool = False) -> list[str]:
    """Every check of this module; ``cuda_here``: the run computes on this machine alone, so
    ``runtime.device=cuda`` needs a CUDA device *here*."""
    problems = cuda_problems(cfg) if cuda_here else []
    return problems + model_problems(cfg) + weight_problems(cfg)


def cuda_problems(cfg: ExperimentConfig) -> list[str]:
    """``runtime.device=cuda`` where torch sees no CUDA device: what to set instead."""
    if cfg.runtime.device != "cuda" or torch.cuda.is_available():
        return []
    return [
        "runtime.device='cuda' but this machine has no CUDA device: use runtime.device=auto or cpu, "
        "or join a GPU cluster with --address (client actors then need runtime.client_resources.num_gpus)"
    ]


def meta_model(cfg: ExperimentConfig) -> tuple[Optional[nn.Module], list[str]]:
    """The configured backbone in pixel space on the meta device, or the problems building it."""
    timm = timm_library()
    if cfg.model.name not in timm.list_models():
        close = timm.list_models(f"*{cfg.model.name.split('_')[0]}*")[:5]
        return None, [f"model.name = {cfg.model.name!r}: not a timm model" + (f" (similar: {close})" if close else "")]
    try:
        with torch.device("meta"):
            backbone = timm.create_model(
                cfg.model.name, pretrained=False, num_classes=META_NUM_CLASSES, **cfg.model.kwargs
            )
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as exc:
        return None, [
            f"model.kwargs = {cfg.model.kwargs!r}: timm.create_model({cfg.model.name!r}) refuses them "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ]
    return pixel_space_model(backbone, cfg.model), []


def model_problems(cfg: ExperimentConfig) -> list[str]:
    model, problems = meta_model(cfg)
    if model is None:
        return problems
    problems += determinism_problems(cfg, model)
    widths = []
    for target in cfg.lora.target_modules:
        found = [m for _, m in matched_modules(model, target)]
        if not found:
            names = sorted({name.split(".", 2)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})[
                :8
            ]
            problems.append(
                f"lora.target_modules entry {target!r} matches no module of {cfg.model.name}; its linear layers "
                f"include {names}"
            )
        widths += [min(m.in_features, m.out_features) for m in found if isinstance(m, nn.Linear)]
    if widths and cfg.lora.rank > min(widths):
        problems.append(
            f"lora.rank = {cfg.lora.rank}: larger than the narrowest targeted layer ({min(widths)} features); "
            f"choose at most {min(widths)} (LoRA is a low-rank update: rank 4-16 is usual)"
        )
    selection = cfg.layer_selection
    if selection.enabled and selection.selection in {"top_k", "random"}:
        try:
            players = player_prefixes(model, selection.players, cfg.lora.target_modules)
        except ValueError as exc:
            problems.append(f"layer_selection.players = {selection.players!r}: {exc}")
        else:
            if selection.top_k > len(players):
                problems.append(
                    f"layer_selection.top_k = {selection.top_k}: the layer game has only {len(players)} players "
                    f"({selection.players} of {cfg.model.name}); choose at most {len(players)}"
                )
    return problems


def determinism_problems(cfg: ExperimentConfig, model: nn.Module) -> list[str]:
    """``runtime.deterministic`` where the clients may compute on a GPU (``device`` auto or cuda)
    with a layer that has no deterministic CUDA backward: refused now, not at the first step."""
    if not cfg.runtime.deterministic or cfg.runtime.device == "cpu":
        return []
    layers = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, NONDETERMINISTIC_CUDA_BACKWARD)
    ]
    if not layers:
        return []
    return [
        f"runtime.deterministic = true with model.name = {cfg.model.name!r}: {', '.join(layers[:3])} has no "
        "deterministic CUDA backward, so training would raise at its first step on a GPU; use a ViT (the models "
        "this check passes), set runtime.deterministic=false, or runtime.device=cpu"
    ]


def weight_problems(cfg: ExperimentConfig) -> list[str]:
    if cfg.model.pretrained != "checkpoint" or not cfg.model.checkpoint:
        return []
    try:
        read_checkpoint(cfg.model.checkpoint)
    except ModelSourceError as exc:
        return [str(exc)]
    return []


def main(argv: Optional[list[str]] = None) -> int:
    """The child's side: ``{"config": ..., "cuda_here": ...}`` as the argument, the problems on stdout."""
    from sylva_ray.engine.resolve import build_config

    request = json.loads((sys.argv[1:] if argv is None else argv)[0])
    try:
        cfg = build_config(request["config"])
    except ConfigError as exc:  # the launcher built this config, so this is rare: a plugin that fails here only
        problems = [str(exc)]
    else:
        problems = model_side_problems(cfg, cuda_here=bool(request.get("cuda_here")))
    json.dump(problems, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
