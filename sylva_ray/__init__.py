"""sylva_ray: personalized federated adversarial fine-tuning of pre-trained vision models on Ray.

Implements Sylva (Qi et al., ACM CCS 2025) -- LoRA adapters fine-tuned adversarially per client,
aggregated with ball-tree weights, personal heads -- and the baselines it is judged against.
"""

__version__ = "0.1.0"
