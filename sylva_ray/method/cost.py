"""What one client's local work costs: FLOPs per optimiser step, and accelerator memory.

**FLOPs** (the simulated clock, ``engine.clock``): one real step of the local loop
(``training.local_step``: every PGD step, the adversarial and benign forwards, the loss, backward
and the optimiser step) runs under torch's ``FlopCounterMode``, which counts the FLOPs of the
matrix products and convolutions from their shapes (2 per multiply-add; element-wise work is not
counted, as in every FLOP count of this kind). It is counted once per batch shape and multiplied by
the client's steps, so the clock is deterministic: no wall-clock time enters it. A model built
on torch's ``meta`` device (no weights, no memory) gives the same count without training: that is
how a ViT-B/16 round is costed on a laptop (``sylva-ray bench clock``).

**Memory**: how much accelerator memory one client actor needs, measured on the host and scaled
to the batch.

Why measure here rather than guess: activation memory dominates adversarial fine-tuning (every
PGD step is a forward + backward through the whole backbone) and depends on the model, its input
size and the precision. The tensors autograd saves for the backward pass are the same on any
device, so one forward at a small batch on the CPU, with
``torch.autograd.graph.saved_tensors_hooks`` counting the saved storages (each once, parameters
left out), measured at two small batches, gives the bytes per sample (the slope) and the bytes
that do not grow with the batch (under bf16 autocast: the bf16 copies of the weights); the
estimate scales them to the configured batch:

    training  = weights + trainable state (grad + optimiser moments) + forwards x act(train.batch_size)
    evaluation = weights + act(train.eval_batch_size)           (PGD-20: one forward + backward at a time)
    act(b)    = fixed + b x per_sample

``forwards`` is 2 when the loss also needs the benign logits (Sylva, TRADES, MART, CalFAT keep both
graphs alive until backward) and 1 otherwise. Not counted: the CUDA context and cuDNN/cuBLAS
workspaces (~0.5-1 GB per process, outside ``torch.cuda.max_memory_allocated``) and allocator
fragmentation: keep 20% headroom (``HEADROOM``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sylva_ray.base.config import ExperimentConfig, TrainConfig
from sylva_ray.base.precision import training_precision
from sylva_ray.method.algorithms import algorithm_for
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.models import pixel_space_model
from sylva_ray.method.pretrained import create_backbone
from sylva_ray.method.training import LocalStep, local_step, make_optimizer, shared_parameters

GIB = 1024**3
#: Batches measured on the CPU; the estimate is linear in the batch through these two points.
PROBE_BATCHES = (2, 4)
#: Fraction of the card to leave free for the CUDA context, workspaces and fragmentation.
HEADROOM = 0.2
#: Optimiser state per trainable parameter: the gradient, plus momentum (SGD) or two moments (AdamW).
OPTIMIZER_COPIES = {"sgd": 2, "adamw": 3}


def _saved_bytes(model: torch.nn.Module, images: torch.Tensor, precision: str) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = images.clone().requires_grad_(True)  # attacks differentiate w.r.t. the input
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        training_precision(precision, images.device),
    ):
        model(images)
    return sum(seen.values())


def _line(model: torch.nn.Module, image_shape: tuple[int, int, int], precision: str) -> tuple[float, float]:
    """(bytes that do not grow with the batch, bytes per sample) of one forward's saved tensors."""
    small, large = (_saved_bytes(model, torch.rand(b, *image_shape), precision) for b in PROBE_BATCHES)
    per_sample = (large - small) / (PROBE_BATCHES[1] - PROBE_BATCHES[0])
    return max(0.0, small - per_sample * PROBE_BATCHES[0]), per_sample


def estimate_actor_memory(
    cfg: ExperimentConfig, image_shape: tuple[int, int, int], num_classes: int, needs_benign: bool = True
) -> dict[str, Any]:
    """Estimated peak GB of one client actor for ``cfg`` (training at ``runtime.precision``,
    evaluation in fp32); see the module docstring for the formula."""
    model = client_model(cfg, num_classes).eval()
    fixed_train, per_sample_train = _line(model, image_shape, cfg.runtime.precision)
    fixed_eval, per_sample_eval = _line(model, image_shape, "fp32")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    forwards = 2 if needs_benign else 1
    train = (
        weights
        + OPTIMIZER_COPIES[cfg.train.optimizer] * trainable
        + forwards * (fixed_train + per_sample_train * cfg.train.batch_size)
    )
    evaluation = weights + fixed_eval + per_sample_eval * cfg.train.eval_batch_size
    return {
        "model": cfg.model.name,
        "input": "x".join(str(s) for s in image_shape),
        "precision": cfg.runtime.precision,
        "train_batch": cfg.train.batch_size,
        "eval_batch": cfg.train.eval_batch_size,
        "weights_gb": round(weights / GIB, 2),
        "activation_mb_per_sample_train": round(per_sample_train / 2**20, 1),
        "activation_mb_per_sample_eval": round(per_sample_eval / 2**20, 1),
        "fixed_mb_per_forward_train": round(fixed_train / 2**20, 1),
        "train_peak_gb": round(train / GIB, 2),
        "eval_peak_gb": round(evaluation / GIB, 2),
        "needs_gb_with_headroom": round(max(train, evaluation) / GIB / (1 - HEADROOM), 2),
    }


def algorithm_needs_benign(cfg: ExperimentConfig) -> bool:
    """Whether the configured algorithm's loss keeps the benign forward's graph too."""
    probe = ArrayDataset(np.zeros((1, 3, 1, 1), dtype=np.float32), np.zeros(1, dtype=np.int64), 2)
    return bool(algorithm_for(cfg).objective(probe).needs_benign)


# --- FLOPs of one local step ---------------------------------------------------------------------
class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the "Global" total."""

    parents = ("Global",)

    def __enter__(self) -> "_NoModuleTracking":
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


class StepFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module breakdown.

    Its module tracker hooks every module's inputs, and ``torch.autograd.grad`` with respect to a
    leaf input then fails ("A leaf node was passed to _will_engine_execute_node", pytorch/pytorch
    #131753, open) -- which is what every PGD step does. Only the total is wanted here.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracking()


def synthetic_step(
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    batch: int,
    image_shape: Sequence[int],
    num_classes: int,
    precision: str,
    device: torch.device,
) -> tuple[LocalStep, torch.Tensor]:
    """The training loop's own step (``training.local_step``) of ``cfg``'s algorithm on ``model``,
    for a batch of ``batch`` synthetic images: its context and the batch's labels (every class in
    turn). What a step costs depends on shapes, not on pixels: the FLOP count and the doctor's
    timed step both build it here, so both measure the step a client runs."""
    labels = torch.arange(batch) % num_classes
    data = ArrayDataset(np.zeros((batch, *image_shape), dtype=np.float32), labels.numpy(), num_classes)
    objective = algorithm_for(cfg).objective(data)
    trainable = [p for p in model.parameters() if p.requires_grad]
    local = shared_parameters(model) if objective.uses_anchor else None
    anchor = {k: v.detach().clone() for k, v in local.items()} if local is not None else None
    step = LocalStep(
        model,
        objective,
        objective.attack(model, 0),
        make_optimizer(trainable, cfg.train),
        trainable,
        cfg.train,
        precision,
        device,
        local,
        anchor,
    )
    return step, labels


#: FLOPs do not depend on the dtype, and autocast has no meta device: the count runs in fp32.
FLOP_COUNT_PRECISION = "fp32"


def count_step_flops(model: torch.nn.Module, cfg: ExperimentConfig, batch: int, image_shape, num_classes: int) -> int:
    """FLOPs of one local step of ``cfg``'s algorithm at this batch size, on a ``meta``-device model.

    The step is the training loop's own (``training.local_step``), with the configured attack,
    loss (benign branch and proximal anchor included) and optimiser. Counted on ``meta`` tensors,
    where scaled-dot-product attention decomposes into the matrix products it computes: on the CPU
    torch runs a fused attention kernel that the counter does not see, so a CPU count would depend
    on which kernel the machine picked.
    """
    device = torch.device("meta")
    ctx, labels = synthetic_step(model, cfg, batch, image_shape, num_classes, FLOP_COUNT_PRECISION, device)
    model.train()
    with StepFlopCounter() as counter:
        local_step(ctx, torch.rand(batch, *image_shape, device=device), labels, attack_seed=0, dropout_seed=0)
    return int(counter.get_total_flops())


def client_model(cfg: ExperimentConfig, num_classes: int) -> torch.nn.Module:
    """``cfg``'s model as a client trains it (the algorithm's scope: LoRA, or the full model),
    without pre-trained weights: for costing shapes, FLOPs and bytes, never for results."""
    blank = dataclasses.replace(cfg.model, pretrained="none")
    return algorithm_for(cfg).scope.wrap(pixel_space_model(create_backbone(blank, num_classes), blank), cfg.lora)


def meta_model(cfg: ExperimentConfig, num_classes: int) -> torch.nn.Module:
    """``client_model`` on the ``meta`` device: no weights, no memory."""
    with torch.device("meta"):
        return client_model(cfg, num_classes)


def step_flops_by_batch(
    cfg: ExperimentConfig, image_shape: tuple[int, ...], num_classes: int, batch_sizes: Iterable[int]
) -> dict[int, int]:
    """``{batch size: FLOPs of one local step}`` on the meta-device model, no weights, no training.

    Under Dirichlet skew every client's last batch has its own size (nine shapes for the default
    preset, ~0.4 s of counting each). Every product in these models is linear in the batch, so the
    largest and smallest sizes are counted, then a third, middle one: if the line through the first
    two predicts it exactly, the others are read off the line; if not (a model with per-batch work
    that is not linear), every size is counted.
    """
    model = meta_model(cfg, num_classes)
    sizes = sorted(set(batch_sizes))

    def count(batch: int) -> int:
        return count_step_flops(model, cfg, batch, image_shape, num_classes)

    if len(sizes) <= LINE_POINTS:
        return {b: count(b) for b in sizes}
    low, high, middle = sizes[0], sizes[-1], sizes[len(sizes) // 2]
    counted = {low: count(low), high: count(high), middle: count(middle)}
    slope, remainder = divmod(counted[high] - counted[low], high - low)

    def line(batch: int) -> int:
        return counted[low] + slope * (batch - low)

    if remainder == 0 and line(middle) == counted[middle]:
        return {b: counted.get(b, line(b)) for b in sizes}
    return {b: counted.get(b) or count(b) for b in sizes}


#: Batch sizes counted before the rest may be read off a line (two points and a check).
LINE_POINTS = 3


def batch_sequence(num_samples: int, batch_size: int, local_epochs: int, local_steps: Optional[int]) -> list[int]:
    """The batch sizes of one local round, in order, as ``training.adversarial_round`` draws them."""
    full, last = divmod(num_samples, batch_size)
    per_epoch = [batch_size] * full + ([last] if last else [])
    sequence = per_epoch * local_epochs
    return sequence if local_steps is None else sequence[:local_steps]


def batch_sizes_of(num_samples: Iterable[int], train: TrainConfig) -> list[int]:
    """The distinct batch shapes a set of clients trains with in a round."""
    return sorted(
        {b for n in num_samples for b in batch_sequence(n, train.batch_size, train.local_epochs, train.local_steps)}
    )
