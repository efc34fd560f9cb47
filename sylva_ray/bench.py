"""``sylva-ray bench``: figures measured side by side in one run, reported as ratios.

``comm``: serialised bytes of one LoRA upload vs one full-model upload, for the configured model
and for ViT-B/16 (rank 8 on ``attn.qkv``, METHOD.md's arithmetic: ~0.29M LoRA parameters vs ~86M).
Models are built without weights (byte counts do not depend on the values).
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from sylva_ray.config import ExperimentConfig, LoRAConfig, ModelConfig
from sylva_ray.models import add_lora, count_parameters, create_backbone, _pixel_model, full_model_nbytes, shared_state, encode_state

log = logging.getLogger(__name__)

#: The paper-scale reference point named in the issue: ViT-B/16, LoRA rank 8 on the fused qkv.
VIT_B16 = ("vit_base_patch16_224", LoRAConfig(rank=8, target_modules=["attn.qkv"]))


def communication_row(model_cfg: ModelConfig, lora_cfg: LoRAConfig, num_classes: int) -> dict[str, object]:
    blank = dataclasses.replace(model_cfg, pretrained="none")
    base = _pixel_model(create_backbone(blank, num_classes), blank)
    full = full_model_nbytes(base)
    model = add_lora(base, lora_cfg)
    adapter = len(encode_state(shared_state(model)))
    params = count_parameters(model)
    return {
        "model": model_cfg.name,
        "lora": f"r{lora_cfg.rank} on {','.join(lora_cfg.target_modules)}",
        "lora_params": params["shared"],
        "head_params": params["personal"],
        "adapter_bytes": adapter,
        "full_model_bytes": full,
        "full_over_adapter": round(full / adapter, 1),
    }


def bench_comm(cfg: ExperimentConfig) -> pd.DataFrame:
    rows = [communication_row(cfg.model, cfg.lora, 10)]
    name, lora = VIT_B16
    rows.append(communication_row(ModelConfig(name=name, pretrained="none"), lora, 10))
    return pd.DataFrame(rows)


BENCHES = {"comm": bench_comm}


def run_bench(which: str, cfg: ExperimentConfig) -> pd.DataFrame:
    return BENCHES[which](cfg)
