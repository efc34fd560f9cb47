"""CPU-sized timm models registered under their own names (timm's ``@register_model`` habit).

``vit_pico_patch4_16`` is the ViT the embedded-default study measured (docs results/default-run.md):
depth 4, width 96, 3 heads, 4x4 patches on a 16x16 input (8x8 digits are upsampled inside the
model), ~0.45M parameters, so that 10 clients x 10 rounds of PGD training fit a 2-core CPU.
``vit_pico_deep_patch4_16`` is the same ViT twice as deep (8 blocks, ~0.9M parameters), so that
Phase 2's layer game has 8 players (256 coalitions) instead of 4 (16).
The factories only fill in hyper-parameters; everything else is timm's VisionTransformer.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

#: Input side of the pico ViT: 8x8 digits upsampled x2, so 4x4 patches give a 4x4 token grid.
PICO_INPUT_SIDE = 16

#: Blocks of the default pico ViT and of its deep variant.
PICO_DEPTH, PICO_DEEP_DEPTH = 4, 8

_PICO_CFG = {
    "input_size": (3, PICO_INPUT_SIDE, PICO_INPUT_SIDE),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "num_classes": 10,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "first_conv": "patch_embed.proj",
    "classifier": "head",
}
default_cfgs = generate_default_cfgs(
    {"vit_pico_patch4_16": dict(_PICO_CFG), "vit_pico_deep_patch4_16": dict(_PICO_CFG)}
)


@register_model
def vit_pico_patch4_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Pico/4 at 16x16: 4 blocks x 96 dims x 3 heads (the embedded default's model)."""
    model_args = dict(img_size=PICO_INPUT_SIDE, patch_size=4, embed_dim=96, depth=PICO_DEPTH, num_heads=3)
    return _create_vision_transformer("vit_pico_patch4_16", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_pico_deep_patch4_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Pico/4 at 16x16, 8 blocks deep: more players for Phase 2's layer game."""
    model_args = dict(img_size=PICO_INPUT_SIDE, patch_size=4, embed_dim=96, depth=PICO_DEEP_DEPTH, num_heads=3)
    return _create_vision_transformer("vit_pico_deep_patch4_16", pretrained=pretrained, **dict(model_args, **kwargs))
