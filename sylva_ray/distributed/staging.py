"""The pre-trained backbone as the client actors load it: where torch is, never the launching process.

The driver actor stages it for a run (``DriverActor.stage_backbone``) while the client actors
import torch; a Tune sweep's process stages it once for all its trials (``launcher.stage_inputs``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from sylva_ray.base.config import ExperimentConfig, ModelConfig
from sylva_ray.method.data import DataSource
from sylva_ray.method.pretrained import pretrained_backbone_state

log = logging.getLogger(__name__)

#: torch dtypes numpy also has (bf16 weights travel as tensors).
NUMPY_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool}
)


def shareable_state(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors as numpy arrays where numpy has the dtype: Ray hands numpy arrays to every actor on
    a node as read-only views of the one copy in its object store, where a pickled tensor would
    be unpickled into a private copy per actor (ViT-B/16: 330 MB each, at start-up)."""
    return {k: v.numpy() if v.dtype in NUMPY_DTYPES else v for k, v in state.items()}


def staged_backbone(
    cfg: ExperimentConfig, source: DataSource, model: Optional[ModelConfig] = None
) -> tuple[dict[str, Any], float]:
    """The pre-trained weights (pre-training on the public slice, a checkpoint or hub weights) as a
    shareable state, and the seconds it took to get them; ``model``: ``cfg.model`` with its paths
    made absolute where the launcher runs (``launcher.absolute_paths``), if this is elsewhere."""
    started = time.perf_counter()
    state = shareable_state(pretrained_backbone_state(model or cfg.model, cfg.data, source))
    seconds = time.perf_counter() - started
    log.info("pre-trained weights ready in %.1fs", seconds)
    return state, seconds
