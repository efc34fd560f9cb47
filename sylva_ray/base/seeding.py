"""Explicit seeds derived from (global seed, purpose, round, client, ...), never from global state.

``derive_seed(0, "train", 3, 7)`` is the same on every machine and in every actor, so a client's
randomness does not depend on which actor ran it or in which order clients finished.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:  # torch is imported where a torch generator is made: config checks never need it
    import torch

#: Seeds are cut to 63 bits so they fit torch.manual_seed and numpy alike.
_SEED_BITS = 63
#: torch's default generators are process-global: two threads in seeded blocks at once (``compare``
#: runs several ``run()``s in threads) would interleave their draws, so each block holds this lock.
#: Re-entrant: a seeded block may call code that opens another.
_GLOBAL_RNG_LOCK = threading.RLock()


def derive_seed(base_seed: int, *keys: int | str) -> int:
    """A reproducible 63-bit seed from a base seed and any mix of ints and strings."""
    words = [int(base_seed)]
    for key in keys:
        words.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key))
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << _SEED_BITS) - 1))


def numpy_rng(base_seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(base_seed, *keys))


def torch_generator(seed: int) -> torch.Generator:
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch seed and restore the caller's RNG state afterwards.

    torchattacks draws its random start from torch's global generator; forking keeps that draw
    reproducible without leaking a seed into the rest of the process. The block runs under a
    process-wide lock, so a seeded block in another thread cannot draw from the same generator
    meanwhile (the draws, and so the results, do not depend on how threads interleave).
    """
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
