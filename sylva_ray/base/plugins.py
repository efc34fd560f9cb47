"""Your own algorithms, datasets, aggregation rules and adversary behaviours, from files of your own.

``runtime.plugins`` lists modules (``my_package.my_algorithm``) or Python files
(``extensions/my_algorithm.py``) that register things with the package's registries
(``ALGORITHMS``, ``DATASETS``, ``AGGREGATORS``, ``BEHAVIOURS``, ...) when imported. Every process that looks a name
up imports them first: the main process when it resolves the config, each client actor when it
builds its worker, the driver actor when it starts the federation. A file is imported once per
process (the registries refuse a second registration of a name).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from sylva_ray.base.config import ConfigError

#: Files already imported in this process, by absolute path -> module name.
_LOADED_FILES: dict[str, str] = {}


def is_file_entry(entry: str) -> bool:
    return entry.endswith(".py")


def load_plugins(entries: Sequence[str]) -> None:
    """Import every entry of ``runtime.plugins``; ``ConfigError`` naming the entry if one fails."""
    for entry in entries:
        try:
            if is_file_entry(entry):
                _load_file(Path(entry).expanduser().resolve())
            else:
                importlib.import_module(entry)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure of the user's module is the user's to fix
            raise ConfigError(
                f"runtime.plugins entry {entry!r} could not be imported ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); give an importable module name or a "
                "path to a .py file that exists on every node"
            ) from None


def _load_file(path: Path) -> None:
    key = str(path)
    if key in _LOADED_FILES:
        return
    if not path.is_file():
        raise ConfigError(f"runtime.plugins entry {key!r}: no such file")
    name = f"sylva_ray_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"runtime.plugins entry {key!r}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    _LOADED_FILES[key] = name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name], _LOADED_FILES[key]
        raise
