"""Write an ImageFolder of PNG files, as a user's own data would look: ``root/<class>/<n>.png``.

    python docs/examples/make_image_folder.py runs/digits64 --per-class 2000 --size 64

Scikit-learn's digits (the ten classes), scaled to ``--size`` pixels, tinted and noised per image,
so the files differ and compress like photographs rather than like flat test patterns. The data
benchmark (``sylva-ray bench data``) and the results page were measured on such a folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

#: digits are 8x8 with grey levels 0..16.
DIGITS_MAX_LEVEL = 16.0
#: Gaussian pixel noise (on 0..255) and the range of the per-image tint.
NOISE_STD, TINT_LOW = 12.0, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    digits = load_digits()
    for label in range(10):
        folder = args.root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        examples = digits.images[digits.target == label] / DIGITS_MAX_LEVEL
        for n in range(args.per_class):
            grey = Image.fromarray((examples[n % len(examples)] * 255).astype(np.uint8)).resize(
                (args.size, args.size), Image.Resampling.BILINEAR
            )
            tint = rng.uniform(TINT_LOW, 1.0, size=3)
            pixels = np.asarray(grey, dtype=np.float32)[..., None] * tint + rng.normal(
                0, NOISE_STD, (args.size, args.size, 3)
            )
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{n}.png")


if __name__ == "__main__":
    main()
