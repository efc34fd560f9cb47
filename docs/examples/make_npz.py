"""Write ``my_data.npz`` here: scikit-learn's digits as (N, 8, 8, 3) uint8 images and their labels,
the layout ``my_dataset.py`` reads.

    python docs/examples/make_npz.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

#: digits are 8x8 with grey levels 0..16.
DIGITS_MAX_LEVEL = 16

digits = load_digits()
grey = (digits.images * 255 // DIGITS_MAX_LEVEL).astype(np.uint8)
np.savez("my_data.npz", images=np.repeat(grey[..., None], 3, axis=-1), labels=digits.target)
