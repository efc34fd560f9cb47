"""Images decoded to uint8 arrays: a folder (``root/<class>/<image>``, torchvision's ImageFolder
layout), or encoded bytes from a table (``method.hf_data``).

Decoded once, in parallel threads with a progress bar, resized to ``data.image_size`` exactly as
torchvision's ``Resize`` + ``PILToTensor`` would (PIL's bilinear resize of the RGB image), and
kept as uint8: a quarter of float32's bytes. A damaged or unreadable file is refused with its
path. The arrays are cached under ``$SYLVA_RAY_CACHE/images/`` as a plain ``.npz`` (arrays only,
read with ``allow_pickle=False``), keyed by the folder's file list, sizes and modification times
and the image size: a second run on the same folder starts at once, and any changed, added or
removed file makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from sylva_ray.base.storage import atomic_write_with

log = logging.getLogger(__name__)

#: The image files torchvision's ImageFolder takes (``torchvision.datasets.folder.IMG_EXTENSIONS``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Bumped when the decoding changes, so old cache entries are never read for new code.
DECODE_VERSION = 1
#: Colour channels after ``convert("RGB")``.
CHANNELS = 3
#: Bytes per decoded pixel value (uint8).
BYTES_PER_VALUE = 1


class DamagedImage(ValueError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class FolderIndex:
    """The folder as ImageFolder sees it: sorted class folders, each one's image files, sorted."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, positions: np.ndarray) -> "FolderIndex":
        return FolderIndex(self.root, self.classes, [self.files[i] for i in positions], self.labels[positions])

    def decoded_bytes(self, image_size: int) -> int:
        """Bytes the decoded pool takes as uint8 (N x 3 x S x S), before any file is opened."""
        return len(self.files) * CHANNELS * image_size * image_size * BYTES_PER_VALUE

    def cache_key(self, image_size: int) -> str:
        """Every file's path, size and modification time, the image size and the decoding's version."""
        digest = hashlib.sha256(json.dumps({"version": DECODE_VERSION, "size": image_size}).encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:32]


def index_folder(root: str | Path) -> FolderIndex:
    """The files in ImageFolder's order (``torchvision.datasets.folder.make_dataset``): class
    folders sorted (label = position), each walked in sorted order, its file names sorted."""
    root = Path(root)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir()) if root.is_dir() else []
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            found = [Path(folder) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
            files += found
            labels += [label] * len(found)
    return FolderIndex(root, classes, files, np.asarray(labels, dtype=np.int64))


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """One file as uint8 CHW, resized as torchvision's ``Resize((S, S))`` resizes a PIL image."""
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise DamagedImage(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return decode_bytes(payload, image_size, str(path))


def decode_bytes(payload: bytes, image_size: int, where: str) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) as uint8 CHW of side ``image_size`` (PIL's bilinear
    resize of the RGB image, as torchvision's ``Resize`` on a PIL image); ``where`` names the
    image in the error when it cannot be decoded."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "damaged"
        if isinstance(exc, UnidentifiedImageError):  # its text names PIL's in-memory buffer, not the file
            reason = "not a format PIL can read"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedImage(f"{where}: cannot be decoded as an image ({reason}); remove or replace it") from None


def decode_parallel(
    count: int, decode_one: Callable[[int], np.ndarray], image_size: int, desc: str, progress: bool = True
) -> np.ndarray:
    """``decode_one(i)`` for every i, in threads (PIL releases the GIL while it decodes and
    resizes), into one uint8 array (count, 3, S, S); the first damaged image stops it, named."""
    out = np.empty((count, CHANNELS, image_size, image_size), dtype=np.uint8)
    workers = min(32, (os.cpu_count() or 1) + 4)  # the standard library's default for a thread pool

    def one(position: int) -> None:
        out[position] = decode_one(position)

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for _ in pool.map(one, range(count)):
            bar.update(1)
    return out


def decode_all(index: FolderIndex, image_size: int, progress: bool = True) -> np.ndarray:
    """Every file of ``index`` as one uint8 array (N, 3, S, S)."""
    return decode_parallel(
        len(index),
        lambda i: decode_image(index.files[i], image_size),
        image_size,
        f"decoding {index.root.name}",
        progress,
    )


Decoded = tuple[np.ndarray, np.ndarray, list[str]]  # (uint8 images, labels, class names)


def cached(cache_dir: Optional[Path], key: str, make: Callable[[], Decoded], what: str) -> Decoded:
    """``make()``'s arrays, kept as ``cache_dir/images/KEY.npz`` (plain arrays, written whole or not
    at all, read with ``allow_pickle=False``); None ``cache_dir``: no cache."""
    path = Path(cache_dir) / "images" / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            log.info("%s: %d images from the cache %s", what, len(stored["labels"]), path)
            return stored["images"], stored["labels"], [str(c) for c in stored["classes"]]
    images, labels, classes = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: _save_npz(tmp, images, labels, np.asarray(classes, dtype=str)))
        log.info("%s: %d images decoded, cached in %s", what, len(labels), path)
    return images, labels, classes


def load_folder(
    root: str | Path,
    image_size: int,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
    choose_rows: Callable[[int], Optional[np.ndarray]] = lambda count: None,
) -> Decoded:
    """(uint8 images, labels, class names) of an image folder, from the cache when it is current;
    ``choose_rows(file count)`` gives the positions in the folder's order to decode
    (``data.max_samples``), None for all: the folder is walked once."""
    index = index_folder(root)
    keep = choose_rows(len(index))
    if keep is not None:
        index = index.subset(keep)
    if len(index) == 0:
        raise FileNotFoundError(f"data.root={str(root)!r}: no images found in class subfolders (root/<class>/<image>)")
    return cached(
        cache_dir,
        index.cache_key(image_size),
        lambda: (decode_all(index, image_size, progress), index.labels, list(index.classes)),
        f"image folder {root}",
    )


def _save_npz(path: str, images: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would append .npz to a bare path
        np.savez(handle, images=images, labels=labels, classes=classes)
