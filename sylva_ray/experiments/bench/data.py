"""``sylva-ray bench data``: loading an image source three ways, side by side in one process.

1. ``float32, one thread``: what this project did before: torchvision's ``ImageFolder`` with
   ``Resize`` + ``ToTensor``, image by image, stacked into one float32 array (an ImageFolder only);
2. ``uint8, parallel``: the loader runs use now (``method.image_folder`` / ``method.hf_data``),
   the cache bypassed;
3. ``uint8, cached``: the same a second time, from the cache of decoded arrays.

For each: seconds, the pool's bytes (what the main process holds, and what ``ray.put`` places once
in the object store), the peak of Python-traced memory while loading (numpy's arrays included:
numpy reports its allocations to ``tracemalloc``), and the ratios against the first. The first
two must give the same pixels (checked, not assumed).
"""

from __future__ import annotations

import logging
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.method.data import UINT8_MAX
from sylva_ray.method.hf_data import load_hf
from sylva_ray.method.image_folder import load_folder

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
#: The sources this bench loads (the others are generated or small).
IMAGE_SOURCES = ("imagefolder", "hf")


def _measured(load: Callable[[], np.ndarray]) -> tuple[np.ndarray, float, float]:
    """(images, seconds, peak traced MiB) of one load."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        images = load()
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / BYTES_PER_MB
    finally:
        tracemalloc.stop()
    return images, seconds, peak


def torchvision_float32(root: str, image_size: int) -> np.ndarray:
    """The loader before: torchvision's ImageFolder + Resize + ToTensor, one image at a time."""
    from torchvision import datasets, transforms

    tfm = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    folder = datasets.ImageFolder(
        root, transform=tfm, loader=lambda p: datasets.folder.default_loader(p).convert("RGB")
    )
    return np.stack([folder[i][0].numpy() for i in range(len(folder))]).astype(np.float32)


def bench_data(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    data = cfg.data
    if data.name not in IMAGE_SOURCES:
        raise ConfigError(f"bench data loads an image source: set data.name to one of {list(IMAGE_SOURCES)}")

    def ours(cache: Path | None) -> Callable[[], np.ndarray]:
        if data.name == "imagefolder":
            return lambda: load_folder(data.root or "", data.image_size, cache)[0]
        return lambda: load_hf(
            data.root or "", data.hf_split, data.image_column, data.label_column, data.image_size, cache
        )[0]

    variants: list[tuple[str, Callable[[], np.ndarray]]] = []
    if data.name == "imagefolder":
        variants.append(("float32, one thread (before)", lambda: torchvision_float32(data.root or "", data.image_size)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="sylva-bench-data-") as cache:
        variants += [("uint8, parallel", ours(None)), ("uint8, parallel, into the cache", ours(Path(cache)))]
        variants.append(("uint8, from the cache (second start)", ours(Path(cache))))
        pools = {}
        for name, load in variants:
            images, seconds, peak = _measured(load)
            pools[name] = images
            rows.append(
                {
                    "variant": name,
                    "images": len(images),
                    "dtype": str(images.dtype),
                    "seconds": seconds,
                    "pool_mb": images.nbytes / BYTES_PER_MB,
                    "peak_traced_mb": peak,
                }
            )
            log.info("bench data: %s: %d images in %.2f s, %.0f MiB", name, len(images), seconds, rows[-1]["pool_mb"])
    frame = pd.DataFrame(rows)
    first = frame.iloc[0]
    frame["seconds_vs_first"] = frame["seconds"] / first["seconds"]
    frame["pool_vs_first"] = frame["pool_mb"] / first["pool_mb"]
    frame["peak_vs_first"] = frame["peak_traced_mb"] / first["peak_traced_mb"]
    uint8 = next(p for n, p in pools.items() if n.startswith("uint8"))
    if data.name == "imagefolder":  # the same pixels, or the comparison means nothing
        before = next(iter(pools.values()))
        same = np.array_equal(uint8.astype(np.float32) / np.float32(UINT8_MAX), before)
        frame["same_pixels_as_first"] = same
        if not same:
            raise RuntimeError("bench data: the uint8 loader's pixels differ from torchvision's: a bug, not a figure")
    return frame.round(3)
