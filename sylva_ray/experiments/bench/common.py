"""A configuration with some of its sections updated: what more than one bench uses."""

from __future__ import annotations

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.resolve import build_config


def with_sections(cfg: ExperimentConfig, **sections: dict) -> ExperimentConfig:
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return build_config(raw)
