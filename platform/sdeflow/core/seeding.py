"""Seeds and random-number state: a seed from any tuple of ints and names, and the RNG state a
checkpoint carries so that a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints and names, by hashing: distinct tuples give unrelated
    streams (a linear formula such as seed·K + step would make rank r at step k replay another rank)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
