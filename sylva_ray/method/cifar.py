"""CIFAR-10/100 from torchvision's python format in a local folder, read without running its code.

The "python version" batches are pickles, and ``pickle.load`` calls whatever a file names: a
crafted ``data_batch_1`` would run code on every node that reads it. The unpickler here admits
only what the format holds (dicts, lists, str/bytes, ints, and numpy arrays and dtypes through
numpy's own reconstruct functions) and refuses anything else, naming the file. It is used
always, with or without the md5 check (``data.verify_checksums``; torchvision's published sums).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The globals a CIFAR batch may name: numpy's array/dtype reconstructors (numpy 1 and 2 paths;
#: ``_frombuffer`` is what protocol-5 pickles of arrays use). Nothing else is ever resolved.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
CIFAR_SIDE, CIFAR_CHANNELS = 32, 3
MD5_CHUNK = 1 << 20


class UnsafeDataFile(ValueError):
    """A data file that is not what its format allows (code in a pickle, wrong content, bad checksum)."""


class _Restricted(pickle.Unpickler):
    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeDataFile(
                f"{self.path}: refers to {module}.{name}, which a CIFAR batch never holds; "
                "the file is not the official data (it could run code if unpickled): replace it"
            )
        return super().find_class(module, name)


def safe_load(path: Path) -> Any:
    """Unpickle ``path`` admitting only CIFAR's data types; object arrays are refused too."""
    try:
        with open(path, "rb") as handle:
            value = _Restricted(handle, path).load()
    except UnsafeDataFile:
        raise
    except Exception as exc:  # random bytes reach every corner of the unpickler: Overflow, Memory, Key errors...
        raise UnsafeDataFile(
            f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); the file is damaged"
        ) from None
    _refuse_objects(value, path)
    return value


def _refuse_objects(value: Any, path: Path) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UnsafeDataFile(f"{path}: holds an object array, which a CIFAR batch never does")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_objects(item, path)


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision's python CIFAR files are, and what they are called (and their md5 sums)."""

    folder: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str, str]  # file name, md5, key of the class names
    label_key: str
    archive_url: str


def layout(which: str) -> CifarLayout:
    """The file layout of ``cifar10``/``cifar100``, from torchvision's own class attributes."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    meta = cls.meta
    return CifarLayout(
        cls.base_folder,
        tuple(map(tuple, cls.train_list)),
        tuple(map(tuple, cls.test_list)),
        (meta["filename"], meta["md5"], meta["key"]),
        "labels" if which == "cifar10" else "fine_labels",
        cls.url,
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MD5_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_folder(root: str | Path, which: str) -> Path:
    """``root`` or ``root/<base folder>``, whichever holds the files; a clear error otherwise."""
    spec = layout(which)
    root = Path(root)
    folder = root if root.name == spec.folder else root / spec.folder
    names = [name for name, _ in spec.train + spec.test] + [spec.meta[0]]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r}: expected {spec.folder}/ with {', '.join(names)} (torchvision's python format); "
            f"missing {missing}. Nothing is downloaded at run time: extract {spec.archive_url.rsplit('/', 1)[-1]} "
            f"({spec.archive_url}) so that {folder} holds those files"
        )
    return folder


def read_split(which: str, root: str | Path, train: bool, verify_checksums: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 images (N, 3, 32, 32), int64 labels and the number of classes of one split."""
    spec = layout(which)
    folder = find_folder(root, which)
    files = spec.train if train else spec.test
    meta_name, meta_md5, meta_key = spec.meta
    checks = list(files) + [(meta_name, meta_md5)]
    if verify_checksums:
        for name, md5 in checks:
            if _md5(folder / name) != md5:
                raise UnsafeDataFile(
                    f"{folder / name}: md5 differs from the official file's; the file is damaged or not "
                    "the official CIFAR (set data.verify_checksums=false only for files you made yourself)"
                )
    images, labels = [], []
    for name, _ in files:
        batch = _as_str_keys(safe_load(folder / name), folder / name)
        data = np.asarray(batch.get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE:
            raise UnsafeDataFile(f"{folder / name}: 'data' is {data.dtype} {data.shape}, not uint8 (N, 3072)")
        images.append(data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE))
        labels.append(np.asarray(batch.get(spec.label_key, []), dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise UnsafeDataFile(f"{folder / name}: {len(images[-1])} images but {len(labels[-1])} '{spec.label_key}'")
    names = _as_str_keys(safe_load(folder / meta_name), folder / meta_name).get(meta_key)
    if not isinstance(names, list) or not names:
        raise UnsafeDataFile(f"{folder / meta_name}: no '{meta_key}' list of class names")
    all_labels = np.concatenate(labels)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= len(names)):
        raise UnsafeDataFile(f"{folder}: labels outside 0..{len(names) - 1}")
    return np.concatenate(images), all_labels, len(names)


def _as_str_keys(value: Any, path: Path) -> dict[str, Any]:
    """Batches written by Python 2 have bytes keys (b'data'); by Python 3, str keys."""
    if not isinstance(value, dict):
        raise UnsafeDataFile(f"{path}: a CIFAR batch is a dict, this file holds {type(value).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in value.items()}
