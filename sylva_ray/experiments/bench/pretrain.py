"""``sylva-ray bench pretrain``: embedded pre-training of the default pico ViT and of its 8-block
variant on the public slice, one after the other into a fresh cache: seconds, parameters, the ratio.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.client import ClientWorker
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.pretrained import embedded_weights

#: ``bench pretrain``'s backbones: the embedded default and its deep variant (``method.timm_models``).
PRETRAIN_MODELS = ("vit_pico_patch4_16", "vit_pico_deep_patch4_16")


def bench_pretrain(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Embedded pre-training of each pico ViT on the configuration's public slice, into a fresh
    cache (nothing reused), one after the other in this process: seconds, parameters, ratio to the
    first, and the pre-trained model's clean accuracy on the first client's test split."""
    source = load_source(cfg.data)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in PRETRAIN_MODELS:
            model_cfg = dataclasses.replace(cfg.model, name=name, cache_dir=cache, pretrained="embedded")
            started = time.perf_counter()
            state = embedded_weights(model_cfg, cfg.data, source, seed=0)
            seconds = time.perf_counter() - started
            trial = dataclasses.replace(cfg, model=model_cfg)
            worker = ClientWorker(trial, source, make_partition(source, cfg.data, cfg.runtime.seed), state)
            clean = worker.evaluate(0, worker.initial_state(), worker.initial_adapter).clean_acc
            rows.append(
                {
                    "model": name,
                    "blocks": len(worker.player_names()),
                    "parameters": int(sum(v.numel() for v in state.values())),
                    "public_samples": len(source.public) if source.public is not None else 0,
                    "epochs": model_cfg.pretrain_epochs,
                    "threads": torch.get_num_threads(),
                    "seconds": seconds,
                    "client0_clean_acc": clean,
                }
            )
    frame = pd.DataFrame(rows)
    frame["seconds_vs_first"] = frame["seconds"] / frame["seconds"].iloc[0]
    return frame
