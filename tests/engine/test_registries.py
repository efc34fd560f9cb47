"""The package's registries as ``engine/resolve.py`` and ``engine/preflight.py`` use them: every
config field that names an entry has its registry, every registry refuses a second name, and the
checks ask an entry's facts (``DatasetSpec``, ``RuleSpec``), never a list of names."""

from __future__ import annotations

import numpy as np
import pytest

from sylva_ray.base.config import ConfigError, DataConfig, registry_fields
from sylva_ray.base.registry import Registry
from sylva_ray.engine.preflight import data_problems
from sylva_ray.engine.resolve import REGISTRIES, load_config
from sylva_ray.method.aggregation import AGGREGATORS, aggregate_fedavg, is_sample_weighted, is_selecting
from sylva_ray.method.data import DATASETS, DataSource, load_digits_source
from sylva_ray.method.robust_aggregation import aggregation_problem
from sylva_ray.method.scopes import SCOPES

SMOKE_NO_PRETRAINING = ["model.pretrained=none"]


@pytest.fixture
def scratch(monkeypatch):
    """Registrations made in a test vanish after it: each registry gets a copy of its entries."""
    for registry in REGISTRIES.values():
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def test_every_field_that_names_an_entry_has_its_registry():
    kinds = dict(registry_fields())
    assert kinds == {
        "data.name": "dataset",
        "data.partition": "partitioner",
        "attack.train_attack": "attack",
        "attack.eval_attack": "attack",
        "federation.aggregation": "aggregator",
        "adversary.behaviour": "behaviour",
        "algorithm.name": "algorithm",
    }
    assert set(kinds.values()) == set(REGISTRIES)
    assert all(isinstance(r, Registry) and r.kind == kind for kind, r in REGISTRIES.items())


@pytest.mark.parametrize("registry", [*REGISTRIES.values(), SCOPES], ids=[*REGISTRIES, "scope"])
def test_every_registry_refuses_a_second_registration_of_a_name(registry):
    name = registry.registered()[0]
    entry = registry.get(name)
    with pytest.raises(ValueError, match=f"{registry.kind} '{name}' is already registered"):
        registry.add(name, entry)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(name)(entry)
    assert registry.get(name) is entry


def test_an_unknown_name_is_refused_with_the_names_registered_now(scratch):
    DATASETS.register("mine")(load_digits_source)
    with pytest.raises(ConfigError) as refused:
        load_config("smoke", overrides=["data.name=nope", "federation.aggregation=nope"])
    assert f"data.name = 'nope': unknown; choose one of {DATASETS.names()}" in str(refused.value)
    assert "'mine'" in str(refused.value) and AGGREGATORS.choices() in str(refused.value)


def test_the_dataset_facts_drive_the_checks(scratch):
    DATASETS.register("rooted", reads_root=True)(load_digits_source)
    with pytest.raises(ConfigError, match="data.root is required for data.name='rooted'"):
        load_config("smoke", overrides=["data.name=rooted", *SMOKE_NO_PRETRAINING])
    with pytest.raises(ConfigError, match="public slice of digits/synthetic only, not 'rooted'"):
        load_config("smoke", overrides=["data.name=rooted", "data.root=."])
    DATASETS.register("sliced", public_slice=True)(load_digits_source)
    assert load_config("smoke", overrides=["data.name=sliced"]).model.pretrained == "embedded"
    with pytest.raises(ConfigError, match="digits/synthetic/sliced only"):
        load_config("smoke", overrides=["data.name=rooted", "data.root=."])


def test_a_dataset_that_sizes_its_pool_is_refused_before_it_loads(scratch):
    def never_loaded(cfg: DataConfig) -> DataSource:
        raise AssertionError("sized first: the problem stops the check before loading")

    DATASETS.register("sized", pool_size=lambda cfg: f"data.root = {cfg.root!r}: too big")(never_loaded)
    cfg = load_config("smoke", overrides=["data.name=sized", *SMOKE_NO_PRETRAINING])
    assert data_problems(cfg) == ["data.root = None: too big"]


def test_the_rule_facts_drive_the_checks(scratch):
    AGGREGATORS.register("weighted", sample_weighted=True)(aggregate_fedavg)
    AGGREGATORS.register("picky", selecting=True, too_few=lambda n, f: f"wants {n + 1}")(aggregate_fedavg)
    assert is_sample_weighted("weighted") and not is_sample_weighted("picky") and not is_sample_weighted("nope")
    assert is_selecting("picky") and is_selecting("krum") and not is_selecting("median")
    assert [n for n in AGGREGATORS.registered() if AGGREGATORS.get(n).sample_weighted] == [
        "fedavg",
        "balltree",
        "weighted",
    ]
    with pytest.raises(ConfigError, match="nnm and bucketing mix updates"):
        load_config("smoke", overrides=["federation.aggregation=weighted", "federation.pre_aggregation=[nnm]"])
    with pytest.raises(ConfigError, match="federation.aggregation = 'picky': picky wants 5 per round"):
        load_config("smoke", overrides=["federation.aggregation=picky"])
    assert aggregation_problem("krum", load_config("smoke").federation, 1, 4) == (
        "krum needs n > 2f + 2 updates (f = 1) and gets n = 4"
    )
    assert aggregation_problem("fedavg", load_config("smoke").federation, 1, 4) is None


def test_a_registered_rule_aggregates_through_the_registry(scratch):
    from sylva_ray.method.aggregation import aggregate, update_rule
    from sylva_ray.method.update_space import RoundContext

    @update_rule("first_only", selecting=True)
    def first_only(updates, cfg, context):
        weights = np.eye(len(updates))[0]
        return updates[0], weights

    import torch

    reference = {"w": torch.zeros(2)}
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, 5.0])}]
    merged, weights = aggregate("first_only", states, [1, 1], load_config("smoke").federation, RoundContext(reference))
    assert merged["w"].tolist() == [1.0, 2.0] and weights.tolist() == [1.0, 0.0]
    assert AGGREGATORS.get("first_only").aggregate.__doc__ == first_only.__doc__
