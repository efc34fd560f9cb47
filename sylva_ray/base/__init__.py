"""Ground floor: the configuration schema and the plumbing every layer uses (registries, seeds,
atomic writes, arithmetic precision, plots). Imports nothing else of sylva_ray."""
