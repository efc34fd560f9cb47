"""Checks that need the model's shape, the data's index or a file's content, run in the main
process before a run directory is made or Ray starts: a value that cannot work is one line naming
the field, the value and what is allowed, in about the time of the imports, not a traceback a
minute later from an actor.

* the model is built on torch's ``meta`` device (no memory, no weights): its timm name and
  ``model.kwargs``, the LoRA targets it really has, ``lora.rank`` against the targeted layers'
  width, ``layer_selection.top_k`` against the players of the layer game, and under
  ``runtime.deterministic`` on a GPU, layers whose CUDA backward has no deterministic kernel;
* the data is loaded as the run will load it, every image decoded (CIFAR through the safe reader,
  an ImageFolder sized from its file list first, then decoded in parallel), and split as the run
  will split it; the run then takes the loaded data from this process instead of reading it again;
* a weight file is read as the run will read it (damage is named, never "retry with
  weights_only=False");
* a one-machine cluster's CPUs against ``runtime.client_resources`` (``local_cpus``; the caller
  knows whether the run stays on this machine: ``distributed.connect.check_before_start``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.method.cifar import UnsafeDataFile
from sylva_ray.method.data import PartitionError, load_source, make_partition
from sylva_ray.method.hf_data import read_table
from sylva_ray.method.image_folder import CHANNELS, DamagedImage, index_folder
from sylva_ray.method.layer_selection import player_prefixes
from sylva_ray.method.models import (
    ModelSourceError,
    _pixel_model,
    matched_modules,
    read_checkpoint,
    timm_library,
)

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


def preflight(cfg: ExperimentConfig, *, data: bool = True, local_cpus: Optional[int] = None) -> None:
    """Every check below; raises ``ConfigError`` listing all problems found. ``local_cpus``: the
    CPUs of the one machine the run's Ray cluster will have (None: not a one-machine run)."""
    problems = model_problems(cfg)
    if data:
        problems += data_problems(cfg, local_memory=local_cpus is not None)
    problems += weight_problems(cfg)
    problems += resource_problems(cfg, local_cpus)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


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
    return _pixel_model(backbone, cfg.model), []


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


def data_problems(cfg: ExperimentConfig, local_memory: bool = False) -> list[str]:
    """Load and split the data as the run will: every image decoded (a damaged file is named), the
    partition made; the loaded source stays in this process for the run (``data.load_source``).

    An image folder is first sized from its file list: a pool that cannot fit is refused before a
    single file is decoded. ``local_memory``: the run's Ray cluster is this machine's, so its
    object store (where the pool is put once) is checked too."""
    sized = {"imagefolder": imagefolder_problems, "hf": hf_problems}.get(cfg.data.name)
    if sized is not None:
        problems = sized(cfg, local_memory)
        if problems:
            return problems
    try:
        source = load_source(cfg.data)
        make_partition(source, cfg.data, cfg.runtime.seed)
    except (FileNotFoundError, UnsafeDataFile, PartitionError, DamagedImage) as exc:
        return [str(exc)]
    return []


#: Ray's object store takes this share of a machine's memory by default
#: (``ray._private.ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``).
RAY_OBJECT_STORE_FRACTION = 0.3
BYTES_PER_GB = 1e9


def pool_memory_problems(what: str, pool_bytes: int, local_memory: bool) -> list[str]:
    """The decoded pool against this machine: held once in this process and, on a local run, put
    once in Ray's object store (the actors read it from there without copies)."""
    import psutil

    memory = psutil.virtual_memory()
    store = RAY_OBJECT_STORE_FRACTION * memory.total
    needed = pool_bytes * (2 if local_memory else 1)  # this process's copy (+ the store's, on this machine)
    fix = "lower data.max_samples or data.image_size, or run on a node with more memory"
    problems = []
    if needed > memory.available:
        problems.append(
            f"{what}: the decoded pool takes {pool_bytes / BYTES_PER_GB:.2f} GB as uint8"
            + (", held here and again in Ray's object store" if local_memory else "")
            + f", more than the {memory.available / BYTES_PER_GB:.2f} GB this machine has free; {fix}"
        )
    elif local_memory and pool_bytes > store:
        problems.append(
            f"{what}: the decoded pool takes {pool_bytes / BYTES_PER_GB:.2f} GB as uint8, more than Ray's object "
            f"store on this machine ({RAY_OBJECT_STORE_FRACTION:.0%} of {memory.total / BYTES_PER_GB:.1f} GB = "
            f"{store / BYTES_PER_GB:.2f} GB); {fix}"
        )
    return problems


def hf_problems(cfg: ExperimentConfig, local_memory: bool = False) -> list[str]:
    """A Hugging Face dataset's files, columns and rows, and the memory its decoded pool will take,
    before any image is decoded."""
    data = cfg.data
    try:
        rows = len(read_table(data.root or "", data.hf_split, (data.image_column, data.label_column)))
    except (FileNotFoundError, DamagedImage) as exc:
        return [str(exc)]
    used = min(rows, data.max_samples or rows)
    what = f"data.root = {data.root!r} ({used:,} images at data.image_size={data.image_size})"
    return pool_memory_problems(what, used * CHANNELS * data.image_size * data.image_size, local_memory)


def imagefolder_problems(cfg: ExperimentConfig, local_memory: bool = False) -> list[str]:
    """An ImageFolder's index (class folders and image files) and the memory its decoded pool
    will take, before any image is decoded."""
    index = index_folder(cfg.data.root or "")
    if len(index) == 0:
        return [f"data.root = {cfg.data.root!r}: no images in class subfolders (expected root/<class>/<image>)"]
    used = min(len(index), cfg.data.max_samples or len(index))
    need = cfg.data.num_clients * cfg.data.min_samples_per_client
    if used < need:
        return [
            f"data.num_clients={cfg.data.num_clients} x data.min_samples_per_client={cfg.data.min_samples_per_client} "
            f"= {need} samples needed, but {cfg.data.root} holds {len(index)} images"
            + (f" (data.max_samples={cfg.data.max_samples} kept)" if used < len(index) else "")
        ]
    what = f"data.root = {cfg.data.root!r} ({used:,} images at data.image_size={cfg.data.image_size})"
    return pool_memory_problems(what, index.decoded_bytes(cfg.data.image_size) * used // len(index), local_memory)


def weight_problems(cfg: ExperimentConfig) -> list[str]:
    if cfg.model.pretrained != "checkpoint" or not cfg.model.checkpoint:
        return []
    try:
        read_checkpoint(cfg.model.checkpoint)
    except ModelSourceError as exc:
        return [str(exc)]
    return []


def resource_problems(cfg: ExperimentConfig, local_cpus: Optional[int]) -> list[str]:
    """A run that starts its own one-machine Ray cluster gets this machine's CPUs, no more."""
    if local_cpus is None:
        return []
    cpus = local_cpus
    need = cfg.runtime.client_resources.get("num_cpus", 0)
    if need > cpus:
        return [
            f"runtime.client_resources.num_cpus = {need:g}: this machine has {cpus} CPUs, so no client actor could "
            "start; "
            f"ask for at most {cpus}, or join a larger cluster with --address"
        ]
    return []
