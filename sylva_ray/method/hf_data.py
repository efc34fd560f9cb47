"""Hugging Face datasets on disk: a ``save_to_disk`` folder or parquet files, read with pyarrow.

The formats researchers now keep image data in, read without the ``datasets`` package (which
pins a newer ``requests`` than torchattacks allows): pyarrow, which Ray already brings, reads
both. ``data.root`` is one of

* a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow`` in Arrow's
  stream format), or by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such folder per
  split: ``data.hf_split`` picks one);
* a ``.parquet`` file, or a folder of them (``push_to_hub``'s layout; a split's files are those
  whose name starts with ``data.hf_split``, or all of them).

``data.image_column`` holds the encoded image (the ``Image`` feature's ``{bytes, path}`` struct,
or plain bytes), ``data.label_column`` the integer class. Class names come from the ``ClassLabel``
feature when the files carry one. Images are decoded in parallel to uint8 at ``data.image_size``
(``method.image_folder``), cached the same way, and a damaged one is named by file and row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from sylva_ray.method.image_folder import (
    CHANNELS,
    DECODE_VERSION,
    DamagedImage,
    Decoded,
    cached,
    decode_bytes,
    decode_parallel,
)

#: The files ``save_to_disk`` writes beside its Arrow files.
STATE_FILE, DICT_FILE, INFO_FILE = "state.json", "dataset_dict.json", "dataset_info.json"


@dataclass(frozen=True)
class HFTable:
    """The rows a run uses: where each came from (file, row) for error messages, and the table."""

    files: list[Path]
    table: Any  # pyarrow.Table
    origins: list[tuple[int, int]]  # row -> (file index, row within that file)
    features: dict[str, Any]

    def __len__(self) -> int:
        return self.table.num_rows

    def decoded_bytes(self, image_size: int) -> int:
        return len(self) * CHANNELS * image_size * image_size


def data_files(root: Path, split: str) -> list[Path]:
    """The Arrow or parquet files of ``split`` under ``root``, in order."""
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    if (root / DICT_FILE).is_file():
        splits = json.loads((root / DICT_FILE).read_text()).get("splits", [])
        if split not in splits:
            raise FileNotFoundError(f"data.root={str(root)!r} holds splits {splits}: set data.hf_split to one of them")
        root = root / split
    if (root / STATE_FILE).is_file():
        state = json.loads((root / STATE_FILE).read_text())
        return [root / entry["filename"] for entry in state.get("_data_files", [])]
    parquet = sorted(root.rglob("*.parquet")) if root.is_dir() else []
    chosen = [p for p in parquet if p.name.startswith(split)] or parquet
    if not chosen:
        raise FileNotFoundError(
            f"data.root={str(root)!r}: neither a save_to_disk folder ({STATE_FILE}) nor parquet files; nothing is "
            "downloaded: save the dataset to disk first"
        )
    return chosen


def read_table(root: str | Path, split: str, columns: tuple[str, str]) -> HFTable:
    """The image and label columns of every file of the split, concatenated; the features (class
    names) from the files' own metadata when present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = data_files(Path(root), split)
    tables, origins, features = [], [], {}
    for position, path in enumerate(files):
        try:
            if path.suffix == ".parquet":
                table = pq.read_table(path)
            else:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DamagedImage(f"{path}: not a readable {path.suffix[1:]} file ({str(exc).splitlines()[0]})") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise FileNotFoundError(
                f"{path}: no column {missing[0]!r} (columns: {table.column_names}); set data.image_column / "
                "data.label_column"
            )
        features = features or _features(table.schema.metadata, path)
        tables.append(table.select(list(columns)))
        origins += [(position, row) for row in range(table.num_rows)]
    info = Path(root) / INFO_FILE
    if not features and info.is_file():
        features = json.loads(info.read_text()).get("features", {})
    return HFTable(files, pa.concat_tables(tables), origins, features)


def _features(metadata: Optional[dict[bytes, bytes]], path: Path) -> dict[str, Any]:
    """The ``datasets`` features stored in an Arrow/parquet schema (key ``huggingface``)."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        state_info = path.parent / INFO_FILE
        return json.loads(state_info.read_text()).get("features", {}) if state_info.is_file() else {}
    return json.loads(raw).get("info", {}).get("features", {})


def class_names(features: dict[str, Any], label_column: str, labels: np.ndarray) -> list[str]:
    """A ``ClassLabel``'s names, else the labels' own values 0..max as names."""
    names = (features.get(label_column) or {}).get("names")
    return [str(n) for n in names] if names else [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


def cache_key(table: HFTable, image_size: int, columns: tuple[str, str], keep: Optional[np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps({"version": DECODE_VERSION, "size": image_size, "columns": columns}).encode())
    for path in table.files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if keep is not None:
        digest.update(np.ascontiguousarray(keep).tobytes())
    return digest.hexdigest()[:32]


def load_hf(
    root: str | Path,
    split: str,
    image_column: str,
    label_column: str,
    image_size: int,
    cache_dir: Optional[Path] = None,
    choose_rows: Callable[[int], Optional[np.ndarray]] = lambda count: None,
    progress: bool = True,
) -> Decoded:
    """(uint8 images, labels, class names) of the split's rows; ``choose_rows(row count)`` gives the
    positions to keep (``data.max_samples``), None for all: the files are read once."""
    table = read_table(root, split, (image_column, label_column))
    keep = choose_rows(len(table))
    rows = np.arange(len(table)) if keep is None else keep
    images_column = table.table.column(image_column)
    labels = np.asarray(table.table.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64)

    def decode(position: int) -> np.ndarray:
        row = int(rows[position])
        cell = images_column[row].as_py()
        file_index, file_row = table.origins[row]
        where = f"{table.files[file_index]} row {file_row} ({image_column})"
        payload = cell.get("bytes") if isinstance(cell, dict) else cell
        if payload is None and isinstance(cell, dict) and cell.get("path"):
            image_path = Path(cell["path"])
            image_path = image_path if image_path.is_absolute() else Path(root) / image_path
            payload = image_path.read_bytes() if image_path.is_file() else None
        if not payload:
            raise DamagedImage(f"{where}: no image bytes (and no readable path)")
        return decode_bytes(payload, image_size, where)

    def make() -> Decoded:
        images = decode_parallel(len(rows), decode, image_size, f"decoding {Path(root).name}", progress)
        return images, labels[rows], class_names(table.features, label_column, labels)

    return cached(cache_dir, cache_key(table, image_size, (image_column, label_column), keep), make, f"dataset {root}")
