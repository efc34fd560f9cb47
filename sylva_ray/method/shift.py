"""Feature shift: each client sees its images through its own domain's transform.

Label skew (``data.partition``) changes *which* classes a client holds; feature shift changes *how*
its images look, the other standard kind of non-IID data in personalised federated learning. The
clients are dealt to ``data.shift_domains`` domains (round robin, or a seeded shuffle), and every
image of a client, its train and its test split alike, goes through its domain's transform. The
public slice that pre-trains the embedded backbone is never shifted: the shift is what the
pre-trained model has not seen.

Transforms and the literature each follows (level ``t`` is the domain's strength, 0 = untouched):

- ``rotation``: turn by ``t x 270`` degrees. Four domains at strength 1 are 0/90/180/270 degrees,
  the rotated MNIST of IFCA (Ghosh et al., NeurIPS 2020), where a quarter turn is a lossless
  ``np.rot90``; six domains at strength 75/270 are 0..75 degrees in 15-degree steps, the rotated
  MNIST of Ghifary et al. (ICCV 2015). Other angles are bilinear (``scipy.ndimage.rotate``).
- ``stroke``: thinner or thicker strokes, Morpho-MNIST's thinning and thickening (Castro et al.,
  JMLR 2019) as a grey-level erosion / dilation blended in by ``|t|``; the domains run from
  thinnest (``-strength``) to thickest (``+strength``).
- ``invert``: contrast inversion ``(1 - t) x + t (1 - x)``, the negative images of Hosseini et al.
  (ICMLA 2017) and the polarity flip between FedBN's digit domains (Li et al., ICLR 2021).
- ``contrast``, ``noise``, ``blur``: ImageNet-C's contrast, Gaussian noise and Gaussian blur
  corruptions (Hendrycks & Dietterich, ICLR 2019): contrast scaled about each image's mean by
  ``1 - 0.8 t``, additive N(0, (0.3 t)^2) noise drawn once per image (a fixed corrupted copy, as
  ImageNet-C stores them), blur of sigma ``t x side / 8`` pixels.
- ``mixed``: FedBN-style distinct domains: domain d gets the d-th of ``MIXED_ORDER`` (the first
  untouched) at the full strength.

Everything is numpy (scipy only for the transforms that need it, imported when used): the launching
process, which holds no torch, makes the partition and its record. A client's shifted images
depend only on the partition's record (kind, strength, seed, the client's domain) and the client's
id, never on which process or actor applies them.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sylva_ray.base.seeding import numpy_rng

#: ``data.shift`` kinds; ``none`` switches the shift off.
SHIFT_KINDS = ("none", "rotation", "stroke", "invert", "contrast", "noise", "blur", "mixed")
#: Domain order of ``mixed``: the first domain is untouched, the others each a different kind.
MIXED_ORDER = ("none", "rotation", "invert", "stroke", "blur", "noise", "contrast")
#: Degrees of a full-strength rotation: 4 domains at strength 1 are the quarter turns.
FULL_ROTATION_DEGREES = 270.0
#: A quarter turn, the angle ``np.rot90`` makes exactly.
QUARTER_TURN_DEGREES = 90.0
#: A rotation this close (in quarter turns) to a multiple of 90 degrees is that quarter turn.
QUARTER_TURN_TOLERANCE = 1e-4
#: ImageNet-C-style constants at level 1: contrast kept, noise std, blur sigma as a share of the side.
CONTRAST_LOSS = 0.8
NOISE_STD = 0.3
BLUR_SIGMA_PER_SIDE = 1.0 / 8.0
#: Side of the grey-level erosion/dilation footprint of ``stroke``.
STROKE_FOOTPRINT = 2
#: 8-bit pools are stored as 8-bit images again after a shift (as a saved corrupted copy would be).
UINT8_MAX = 255.0


def domain_levels(kind: str, strength: float, domains: int) -> list[tuple[str, float]]:
    """(kind, level) of each domain: evenly spaced from untouched to ``strength`` (``stroke``: from
    ``-strength`` to ``+strength``); one domain alone is shifted at the full strength."""
    if kind == "none":
        return [("none", 0.0)] * domains
    if kind == "mixed":
        return [(MIXED_ORDER[d % len(MIXED_ORDER)], strength if d % len(MIXED_ORDER) else 0.0) for d in range(domains)]
    if domains == 1:
        return [(kind, strength)]
    fractions = [d / (domains - 1) for d in range(domains)]
    if kind == "stroke":
        return [(kind, strength * (2 * f - 1)) for f in fractions]
    return [(kind, strength * f) for f in fractions]


def assign_domains(num_clients: int, domains: int, assignment: str, rng: np.random.Generator) -> list[int]:
    """Each client's domain: ``round_robin`` (client c in domain c mod D, sizes within one) or
    ``random`` (the same sizes, dealt by a seeded shuffle)."""
    dealt = np.arange(num_clients) % domains
    if assignment == "random":
        dealt = rng.permutation(dealt)
    return [int(d) for d in dealt]


def shift_record(
    kind: str, strength: float, domains: int, assignment: str, seed: int, num_clients: int, rng: np.random.Generator
) -> Optional[dict[str, Any]]:
    """What ``partition.json`` keeps of the shift (None: no shift): enough to redo every client's
    images exactly, with nothing else but the pool."""
    if kind == "none":
        return None
    levels = domain_levels(kind, strength, domains)
    assigned = assign_domains(num_clients, domains, assignment, rng)
    return {
        "kind": kind,
        "strength": strength,
        "assignment": assignment,
        "seed": seed,
        "domains": [{"kind": k, "level": round(level, 6)} for k, level in levels],
        "client_domain": assigned,
    }


def shift_images(
    images: np.ndarray, pixel_scale: float, kind: str, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """(N, C, H, W) stored pixels through one transform; returns the new pixels and their scale.

    Quarter turns move pixels and keep the stored values; every other transform works on floats
    in [0, 1] and returns float32 (scale 1), or uint8 again for an 8-bit pool."""
    if kind == "none" or level == 0.0 or len(images) == 0:
        return images, pixel_scale
    if kind == "rotation":
        angle = level * FULL_ROTATION_DEGREES
        turns = angle / QUARTER_TURN_DEGREES
        if abs(turns - round(turns)) < QUARTER_TURN_TOLERANCE:  # levels are kept to 6 decimals
            return np.ascontiguousarray(np.rot90(images, k=round(turns), axes=(2, 3))), pixel_scale
    unit = images.astype(np.float32) / np.float32(pixel_scale)
    shifted = _float_transform(unit, kind, level, rng)
    shifted = np.clip(shifted, 0.0, 1.0).astype(np.float32)
    if images.dtype == np.uint8 and pixel_scale == UINT8_MAX:
        return np.rint(shifted * UINT8_MAX).astype(np.uint8), UINT8_MAX
    return shifted, 1.0


def _float_transform(unit: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    side = unit.shape[-1]
    if kind == "rotation":
        from scipy.ndimage import rotate

        return rotate(unit, level * FULL_ROTATION_DEGREES, axes=(3, 2), reshape=False, order=1, mode="constant")
    if kind == "stroke":
        from scipy.ndimage import grey_dilation, grey_erosion

        morph = grey_dilation if level > 0 else grey_erosion
        moved = morph(unit, size=(1, 1, STROKE_FOOTPRINT, STROKE_FOOTPRINT))
        return unit + abs(level) * (moved - unit)
    if kind == "invert":
        return (1.0 - level) * unit + level * (1.0 - unit)
    if kind == "contrast":
        mean = unit.mean(axis=(1, 2, 3), keepdims=True)
        return (unit - mean) * (1.0 - CONTRAST_LOSS * level) + mean
    if kind == "noise":
        return unit + rng.normal(0.0, NOISE_STD * level, size=unit.shape).astype(np.float32)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = level * side * BLUR_SIGMA_PER_SIDE
        return gaussian_filter(unit, sigma=(0, 0, sigma, sigma))
    raise ValueError(f"unknown shift kind {kind!r}; choose from {SHIFT_KINDS}")


def client_transform(record: dict[str, Any], client_id: int) -> tuple[str, float]:
    """(kind, level) of a client's domain in a partition's shift record."""
    domain = record["domains"][record["client_domain"][client_id]]
    return domain["kind"], float(domain["level"])


def shift_client_images(
    images: np.ndarray, pixel_scale: float, record: Optional[dict[str, Any]], client_id: int, split: str
) -> tuple[np.ndarray, float]:
    """A client's images (one split) as its domain sees them; seeded by (seed, client, split) so
    the noise of a client is the same in every process."""
    if record is None:
        return images, pixel_scale
    kind, level = client_transform(record, client_id)
    rng = numpy_rng(int(record["seed"]), "shift", client_id, split)
    return shift_images(images, pixel_scale, kind, level, rng)
