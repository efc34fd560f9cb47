"""Sphinx extension: the configuration reference, generated from the schema at every build.

Every field of ``sylva_ray.base.config.ExperimentConfig`` under the name a user writes after
``--set`` (``attack.eps``), with its type, default, allowed values and the description the schema
holds, and what each preset sets. A field that names a registered entry (``data.name``,
``federation.aggregation``, ...) lists the names its registry holds
(``engine.resolve.REGISTRIES``). Generated when the build starts, into
``reference/configuration.md`` (not kept in git), so it cannot go stale; a field without a
description stops the build.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

#: Where the generated page goes, relative to the docs' source folder.
CONFIG_PAGE = Path("reference") / "configuration.md"
#: pydantic/annotated-types constraint -> how the page writes it.
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def type_name(annotation: Any) -> str:
    """``Optional[int]`` -> ``int or None``; ``Literal[...]`` -> ``str``; classes by their name."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0]).__name__
    if origin is typing.Union:
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def allowed(annotation: Any, metadata: list[Any], registry: Any = None) -> str:
    """The values a field accepts, where the schema says: a Literal's choices, numeric bounds, or
    the names its registry holds (and any a plug-in registers)."""
    if registry is not None:
        return ", ".join(f"`{name}`" for name in registry.names()) + ", or your own (`runtime.plugins`)"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
        if literal is not None:
            args, annotation = typing.get_args(literal), literal
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{a}`" for a in args)
    bounds = [f"{BOUNDS[k]} {getattr(m, k)}" for m in metadata for k in BOUNDS if getattr(m, k, None) is not None]
    return ", ".join(bounds)


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def default_text(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (dict, list)):
        return "`" + yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip() + "`"
    return f"`{value}`"


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value and key not in {"client_resources", "kwargs"}:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def configuration_page() -> str:
    """The whole page, as Markdown."""
    from sylva_ray.base.config import PRESETS, ExperimentConfig, registry_kind
    from sylva_ray.engine.resolve import REGISTRIES

    defaults = ExperimentConfig()
    lines = [
        "# Configuration",
        "",
        "Generated from the schema (`sylva_ray/base/config.py`) when the docs are built: every field under the",
        "name you write after `--set`, its type, default, allowed values and description. A run writes its",
        "resolved configuration to `config.yaml` in its run directory; `sylva-ray config` prints it.",
        "",
        "```bash",
        "sylva-ray run --preset smoke --set attack.eps=0.05 --set 'runtime.client_resources={num_cpus: 1}'",
        "sylva-ray run --config my_experiment.yaml --set federation.rounds=20",
        "```",
        "",
        "Layers, last wins: the schema's defaults, the preset (`--preset`), the YAML file (`--config`),",
        "each `--set`; an algorithm's implied settings are applied last (a warning names any of yours they",
        "replace). Unknown fields, wrong types and values out of range are refused before any work.",
        "",
        "## Presets",
        "",
        "| preset | what it sets |",
        "|---|---|",
    ]
    for name, raw in PRESETS.items():
        settings = flatten(raw)
        text = ", ".join(f"`{k}={v}`" for k, v in settings.items()) if settings else "nothing: the defaults"
        lines.append(f"| `{name}` | {cell(text)} |")
    missing = []
    for section in dataclasses.fields(ExperimentConfig):
        sub = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        cls = type(sub)
        lines += ["", f"## `{section.name}`", "", (cls.__doc__ or "").strip().splitlines()[0], ""]
        lines += ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
        for name, info in cls.__pydantic_fields__.items():
            dotted = f"{section.name}.{name}"
            if not (info.description or "").strip():
                missing.append(dotted)
            kind = registry_kind(info)
            if kind is not None and kind not in REGISTRIES:
                raise ExtensionError(f"{dotted} names the {kind!r} registry, which engine.resolve.REGISTRIES lacks")
            registry = REGISTRIES[kind] if kind is not None else None
            lines.append(
                f"| `{dotted}` | {cell(type_name(info.annotation))} | {cell(default_text(getattr(sub, name)))} "
                f"| {cell(allowed(info.annotation, info.metadata, registry))} | {cell(info.description or '')} |"
            )
    scalars = [
        f for f in dataclasses.fields(ExperimentConfig) if not dataclasses.is_dataclass(getattr(defaults, f.name))
    ]
    if scalars:
        lines += ["", "## Top level", "", "| field | type | default | description |", "|---|---|---|---|"]
        for f in scalars:
            info = ExperimentConfig.__pydantic_fields__[f.name]
            if not (info.description or "").strip():
                missing.append(f.name)
            lines.append(
                f"| `{f.name}` | {cell(type_name(info.annotation))} | {cell(default_text(getattr(defaults, f.name)))} "
                f"| {cell(info.description or '')} |"
            )
    if missing:
        raise ExtensionError(f"configuration fields without a description in the schema: {missing}")
    return "\n".join(lines) + "\n"


def write_reference(app: Sphinx) -> None:
    page = Path(app.srcdir) / CONFIG_PAGE
    text = configuration_page()
    if not page.is_file() or page.read_text() != text:  # an unchanged page keeps Sphinx's cache valid
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", write_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
