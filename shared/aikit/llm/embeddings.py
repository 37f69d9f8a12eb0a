"""Embedding vectors on the wire: OpenAI's `encoding_format: base64` is the vector's float32 values, little-endian,
base64-encoded. Decoding then encoding gives back the same bytes (float32 -> float -> float32 is exact)."""

from __future__ import annotations

import base64
import struct

ENCODINGS = ("float", "base64")


def decode_vector(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded, validate=True)
    if len(raw) % 4:
        raise ValueError("a base64 embedding must hold whole float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def encode_vector(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
