"""The wire format of state dicts: safetensors bytes, so the bytes counted are the bytes shipped.

Adapters, uploads and job payloads travel as ``encode_state``'s bytes and come back through
``decode_state``; ``damaged_file_message`` says what is wrong with bytes that are not a weight file.
"""

from __future__ import annotations

from typing import Mapping

import torch
from safetensors.torch import load, save


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a state dict's tensors (the caller's tensors are never shared)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def serialized_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict as actually serialised (safetensors: raw tensors + a JSON header)."""
    return len(encode_state(state))


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """The wire format of an adapter payload: safetensors bytes, so counted bytes = shipped bytes.
    A state without tensors is nothing on the wire (``b""``): a client that shares nothing sends nothing."""
    return save(cpu_copy(state)) if state else b""


def decode_state(payload: bytes) -> dict[str, torch.Tensor]:
    return load(payload) if payload else {}


def damaged_file_message(what: str, exc: BaseException) -> str:
    """``what`` is not a readable weight/checkpoint file: say so, with the reader's first line, and
    never pass on torch's advice to retry with ``weights_only=False`` (that would run the file's code)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        detail = "it refers to Python objects a weight file never holds (it could run code if loaded unsafely)"
    return f"{what}: damaged or not a weight file ({type(exc).__name__}: {detail[:200]}); it is never loaded unsafely"
