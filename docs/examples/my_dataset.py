"""One file of your own: a dataset, your arrays in one ``.npz`` file.

Use it with ``--set 'runtime.plugins=[docs/examples/my_dataset.py]'`` (every process of the run
imports it before looking names up), then name what it registers:

    sylva-ray run --preset smoke --set 'runtime.plugins=[docs/examples/my_dataset.py]' \
        --set data.name=npz --set data.root=my_data.npz --set model.pretrained=none

The docs' tutorial "Add a dataset and an aggregation rule" walks through it; ``tests/test_docs.py``
loads this file through ``runtime.plugins``, loads and splits the data and resolves a run with it.
"""

from __future__ import annotations

import numpy as np

from sylva_ray.base.config import DataConfig
from sylva_ray.method.data import DATASETS, UINT8_MAX, ArrayDataset, DataSource


# --- a dataset: one decorated loader; its facts ride on the decorator ---------------------------------
@DATASETS.register("npz", reads_root=True)
def load_npz(cfg: DataConfig) -> DataSource:
    """``images`` (N, H, W, 3) uint8 and integer ``labels`` (N,) from ``np.savez(data.root, ...)``."""
    with np.load(cfg.root or "") as arrays:  # no pickles: np.load refuses object arrays by default
        images = np.ascontiguousarray(arrays["images"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
        labels = arrays["labels"].astype(np.int64)
    classes = int(labels.max()) + 1
    return DataSource(name="npz", private=ArrayDataset(images, labels, classes, pixel_scale=UINT8_MAX))
