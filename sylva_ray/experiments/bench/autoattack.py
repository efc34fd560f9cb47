"""``sylva-ray bench autoattack``: where the reference AutoAttack's time goes, as ratios from one run.

The final protocol's AutoAttack is most of a default run's time. This bench asks whether any of
that is ours to save. On one client's AutoAttack subset (the client with the most images, usually
the protocol's longest job) it runs the reference AutoAttack once, on the CPU, recording every pass through
the model (batch size; whether an input gradient was taken) and the seconds of each sub-attack.
Then, side by side in the same process and thread:

* a plain PyTorch loop replays exactly those passes on the same model (random inputs of the same
  shapes; forward only, or forward plus the gradient to the input): AutoAttack's seconds over the
  replay's say how much of its time is the model's own work, and how much is the attack around it;
* the model's FLOPs in those passes (counted by ``FlopCounterMode``: matmuls and convolutions; it
  has no formula for the CPU's fused attention kernel, ~3% of the pico ViT's FLOPs) over the
  seconds, against a plain ``F.linear`` at the model's largest layer shape: how close the passes
  run to this core's GEMM rate.

Both ratios near 1 mean the time cannot be cut by orchestration: only fewer images, a weaker
attack, more cores or a faster device make it shorter (docs results/default-run.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.precision import fp32_evaluation
from sylva_ray.base.seeding import derive_seed
from sylva_ray.method.attacks import ReferenceAutoAttack
from sylva_ray.method.data import ArrayDataset, load_source, make_partition
from sylva_ray.method.evaluation import autoattack_hits
from sylva_ray.method.pretrained import torch_threads

log = logging.getLogger(__name__)

#: The reference's sub-attacks, by the runner attribute that holds each, as they are reported.
SUB_ATTACKS = {"apgd": "APGD-CE", "apgd_targeted": "APGD-T", "fab": "FAB-T", "square": "Square"}
#: Passes outside any sub-attack: the reference's own accuracy checks before and between attacks.
CHECKS = "accuracy checks"
#: The row of the whole run.
WHOLE = "all of AutoAttack"
#: Rows of the GEMM that measures this core's rate, and how many times it is timed.
GEMM_ROWS, GEMM_REPEATS = 1024, 200
#: One torch thread, as each client actor has.
BENCH_THREADS = 1


@dataclass(frozen=True)
class Pass:
    """One pass through the model: which sub-attack made it, on how many images, with an input gradient or not."""

    stage: str
    images: int
    gradient: bool


class PassRecorder:
    """Records every forward of ``model`` and times the reference's sub-attacks (this bench's own runner)."""

    def __init__(self, model: nn.Module, attack: ReferenceAutoAttack) -> None:
        self.passes: list[Pass] = []
        self.seconds: dict[str, float] = {}
        self.stage = CHECKS
        self._hook = model.register_forward_hook(self._record)
        for attribute, name in SUB_ATTACKS.items():
            runner = getattr(attack.runner, attribute)
            runner.perturb = self._timed(name, runner.perturb)

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        images = inputs[0]
        self.passes.append(Pass(self.stage, len(images), torch.is_grad_enabled() and images.requires_grad))

    def _timed(self, name: str, perturb: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: object, **kwargs: object) -> torch.Tensor:
            self.stage, started = name, time.perf_counter()
            try:
                return perturb(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.stage = CHECKS

        return run

    def close(self) -> None:
        self._hook.remove()


def replay(model: nn.Module, passes: list[Pass], image_shape: tuple[int, ...]) -> dict[str, float]:
    """The same passes as a plain loop: seconds per stage."""
    seconds: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for one in passes:
        x = torch.rand((one.images, *image_shape), generator=generator)
        started = time.perf_counter()
        if one.gradient:
            x.requires_grad_(True)
            torch.autograd.grad(model(x).sum(), x)
        else:
            with torch.no_grad():
                model(x)
        seconds[one.stage] = seconds.get(one.stage, 0.0) + time.perf_counter() - started
    return seconds


def flops_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, int]:
    """Counted FLOPs of one image's forward, and of its gradient to the input (``FlopCounterMode``:
    matmuls and convolutions; neither elementwise work nor the CPU's fused attention is counted)."""
    x = torch.rand((1, *image_shape))
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(x)
    x.requires_grad_(True)
    out = model(x).sum()
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(out, x)
    return forward.get_total_flops(), backward.get_total_flops()


def gemm_rate(model: nn.Module) -> float:
    """FLOP/s of a plain fp32 ``F.linear`` at the model's largest linear layer shape, ``GEMM_ROWS`` rows."""
    largest = max((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel())
    weight = largest.weight.detach()
    x = torch.rand(GEMM_ROWS, weight.shape[1])
    for _ in range(GEMM_REPEATS // 10):  # warm the kernel and the caches
        F.linear(x, weight)
    started = time.perf_counter()
    for _ in range(GEMM_REPEATS):
        F.linear(x, weight)
    return 2.0 * GEMM_ROWS * weight.numel() * GEMM_REPEATS / (time.perf_counter() - started)


def _most_images(sizes: dict[int, int]) -> int:
    """The client with the most AutoAttack images (the lowest id among equals)."""
    return min(sizes, key=lambda c: (-sizes[c], c))


def _subject(cfg: ExperimentConfig, run_dir: Optional[Path]) -> tuple[int, nn.Module, ArrayDataset]:
    """(client, model on the CPU, test split): with ``run_dir`` (whose config ``cfg`` is) the run's
    final model of the client with the most AutoAttack images; without, the configured pre-trained
    model with the initial adapter and head."""
    limit = cfg.evaluation.autoattack_max_samples
    if run_dir is not None:
        from sylva_ray.experiments.api import load_client_model, load_client_split, load_run_partition

        _, partition = load_run_partition(run_dir)  # test sizes from the indices: no client's images loaded
        client = _most_images({c: min(len(t), limit) for c, t in enumerate(partition.test)})
        return client, load_client_model(run_dir, client), load_client_split(run_dir, client, "test")
    from sylva_ray.engine.client import ClientWorker
    from sylva_ray.method.layer_selection import fuse

    source = load_source(cfg.data)
    worker = ClientWorker(cfg, source, make_partition(source, cfg.data, cfg.runtime.seed))
    client = _most_images({c: min(len(worker.data(c).test), limit) for c in range(cfg.data.num_clients)})
    model = fuse(worker.model, worker.initial_adapter, worker.initial_personal).to("cpu")  # a GPU host's too
    return client, model, worker.data(client).test


def bench_autoattack(cfg: ExperimentConfig, out: Path, run_dir: Optional[Path] = None) -> pd.DataFrame:
    """One row per sub-attack and one for all of AutoAttack: passes, images, FLOPs, seconds in the
    reference, seconds of the plain replay, and the two ratios (module docstring)."""
    client, model, test = _subject(cfg, run_dir)
    model.eval()
    n = min(len(test), cfg.evaluation.autoattack_max_samples)
    images, labels = test.pixels(slice(0, n)), torch.from_numpy(test.labels[:n])
    image_shape = tuple(images.shape[1:])
    seed = derive_seed(derive_seed(cfg.runtime.seed, "eval", client), "autoattack")  # as the protocol seeds it
    log.info("bench autoattack: client %d, %d images, %d torch thread(s)", client, n, BENCH_THREADS)
    with torch_threads(BENCH_THREADS), fp32_evaluation(torch.device("cpu")):
        auto = ReferenceAutoAttack(model, cfg.attack, test.num_classes, seed)
        recorder = PassRecorder(model, auto)
        started = time.perf_counter()
        try:
            hits = autoattack_hits(auto, images, labels, seed, cfg.train.eval_batch_size)
        finally:
            recorder.close()
        total = time.perf_counter() - started
        recorder.seconds[CHECKS] = total - sum(recorder.seconds.values())
        replayed = replay(model, recorder.passes, image_shape)
        forward_flops, gradient_flops = flops_per_image(model, image_shape)
        gemm = gemm_rate(model)
    rows = []
    for stage in [*SUB_ATTACKS.values(), CHECKS, WHOLE]:
        passes = [p for p in recorder.passes if stage in (p.stage, WHOLE)]
        if not passes:
            continue
        forward_images = sum(p.images for p in passes)
        gradient_images = sum(p.images for p in passes if p.gradient)
        flops = forward_images * forward_flops + gradient_images * gradient_flops
        seconds = total if stage == WHOLE else recorder.seconds.get(stage, 0.0)
        plain = sum(replayed.values()) if stage == WHOLE else replayed.get(stage, 0.0)
        rate = flops / seconds if seconds > 0 else float("nan")
        rows.append(
            {
                "stage": stage,
                "passes": len(passes),
                "images_forward": forward_images,
                "images_gradient": gradient_images,
                "gflop": flops / 1e9,
                "seconds": seconds,
                "plain_loop_seconds": plain,
                "vs_plain_loop": seconds / plain if plain > 0 else float("nan"),
                "gflop_per_s": rate / 1e9,
                "gemm_gflop_per_s": gemm / 1e9,
                "vs_gemm": rate / gemm,
            }
        )
    frame = pd.DataFrame(rows)
    frame.insert(0, "client", client)
    frame.insert(1, "images", n)
    frame["autoattack_acc"] = float(hits.float().mean()) if n else float("nan")
    frame["reference_strength"] = auto.reference_strength
    return frame.round(4)
