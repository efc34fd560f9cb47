"""``sylva-ray bench comm``: serialised bytes of one LoRA upload vs one full-model upload, for the
configured model and for ViT-B/16 (rank 8 on ``attn.qkv``; ~0.29M vs ~86M parameters).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ExperimentConfig, LoRAConfig, ModelConfig
from sylva_ray.method.models import add_lora, count_parameters, full_model_nbytes, pixel_space_model, shared_state
from sylva_ray.method.pretrained import create_backbone
from sylva_ray.method.wire import encode_state

#: The paper-scale reference point: ViT-B/16, LoRA rank 8 on the fused qkv.
VIT_B16 = ("vit_base_patch16_224", LoRAConfig(rank=8, target_modules=["attn.qkv"]))


def communication_row(model_cfg: ModelConfig, lora_cfg: LoRAConfig, num_classes: int) -> dict[str, object]:
    blank = dataclasses.replace(model_cfg, pretrained="none")
    base = pixel_space_model(create_backbone(blank, num_classes), blank)
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


def bench_comm(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    name, lora = VIT_B16
    return pd.DataFrame(
        [
            communication_row(cfg.model, cfg.lora, 10),
            communication_row(ModelConfig(name=name, pretrained="none"), lora, 10),
        ]
    )
