"""``base/registry.py``: the one registry type -- plain entries, specs built by the decorator,
duplicates and wrong types refused, the choices' text made from what is registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from sylva_ray.base.registry import Registry


@dataclass(frozen=True)
class Spec:
    run: Callable[[], int]
    fast: bool = False


def one() -> int:
    return 1


def test_a_plain_registry_stores_what_is_decorated_and_refuses_a_second_name():
    things: Registry[Callable[[], int]] = Registry("thing")
    assert things.register("one")(one) is one
    assert things.get("one") is one and "one" in things and things.find("two") is None
    with pytest.raises(ValueError, match=r"thing 'one' is already registered \(by tests\.base\.test_registry\)"):
        things.register("one")(lambda: 2)
    assert things.get("one") is one  # the first registration stands
    with pytest.raises(TypeError, match="carry no facts"):
        things.register("fast_one", fast=True)


def test_a_spec_registry_builds_the_spec_from_the_function_and_its_facts():
    specs: Registry[Spec] = Registry("spec", Spec)
    assert specs.register("one", fast=True)(one) is one  # the module keeps its function
    assert specs.get("one") == Spec(one, fast=True)
    ready = Spec(lambda: 2)
    assert specs.register("two")(ready) is ready and specs.get("two") is ready
    specs.add("three", Spec(lambda: 3))
    with pytest.raises(TypeError, match="a spec entry must be a Spec, got function"):
        specs.add("four", one)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        specs.add("one", Spec(one))
    assert specs.registered() == ["one", "two", "three"] and specs.names() == ["one", "three", "two"]
    assert len(specs) == 3 and list(specs) == ["one", "three", "two"]


def test_the_choices_text_lists_what_is_registered():
    specs: Registry[Spec] = Registry("spec", Spec)
    specs.register("b")(one)
    specs.register("a")(one)
    assert specs.choices() == "choose one of ['a', 'b']"
    assert specs.unknown("x.name", "c") == "x.name = 'c': unknown; choose one of ['a', 'b']"
    with pytest.raises(KeyError, match=r"unknown spec 'c'; choose one of \['a', 'b'\]"):
        specs.get("c")
