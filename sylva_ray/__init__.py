"""sylva_ray: personalized federated adversarial fine-tuning of pre-trained vision models on Ray.

Implements Sylva (Qi et al., ACM CCS 2025) -- LoRA adapters fine-tuned adversarially per client,
aggregated with ball-tree weights, personal heads -- and the baselines it is judged against.
"""

__version__ = "0.1.0"

__all__ = ["load_client_model", "load_client_split"]


def __getattr__(name: str):  # lazy: `import sylva_ray` stays cheap (no torch/timm/ray at import)
    if name in __all__:
        from sylva_ray.experiments import api

        return getattr(api, name)
    raise AttributeError(f"module 'sylva_ray' has no attribute {name!r}")
