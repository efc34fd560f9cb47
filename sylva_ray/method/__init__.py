"""The method, Ray-free and engine-free: data and partitions, models and scopes, attacks, losses,
the local training loop, aggregation, Shapley estimators, layer games, sanity checks and the
algorithms (Sylva and its baselines). Imports only ``sylva_ray.base``."""
