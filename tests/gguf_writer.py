"""A minimal GGUF v3 writer, so tests can make tiny GGUF files with known contents.

Written from the format description (magic, version, counts, typed key/values, a tensor table with
dims fastest-first, 32-byte aligned data) and ggml's block layouts, independently of the reader in
``anemll_mlx.loading.gguf``, so the two check each other.  Quantizers here are simple, not
llama.cpp's: tests compare the reader's output with :func:`dequantize` of the bytes written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ggml type name -> (type id, weights per block, bytes per block)
GGML_TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q5_K": (13, 256, 176),
    "BF16": (30, 1, 2),
}
# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_NUMPY_VALUE_TYPES = {
    np.dtype(np.uint8): UINT8,
    np.dtype(np.int8): INT8,
    np.dtype(np.uint16): UINT16,
    np.dtype(np.int16): INT16,
    np.dtype(np.uint32): UINT32,
    np.dtype(np.int32): INT32,
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.uint64): UINT64,
    np.dtype(np.int64): INT64,
    np.dtype(np.float64): FLOAT64,
}
_FORMATS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}


@dataclass
class Tensor:
    """Bytes of one tensor as stored, with its row-major shape and ggml type name."""

    type: str
    shape: tuple[int, ...]
    data: bytes


# --- quantizers (ggml block layouts) ------------------------------------------------------------


def _blocks(x: np.ndarray) -> np.ndarray:
    assert x.shape[-1] % 32 == 0, "rows must be whole 32-weight blocks"
    return np.asarray(x, dtype=np.float32).reshape(-1, 32)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").reshape(-1, 1).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 values 0..15 -> 16 bytes: byte j holds weight j (low nibble) and weight j + 16 (high)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q8_0(x: np.ndarray) -> bytes:
    """Block: fp16 d, 32 int8 q; x = d * q."""
    b = _blocks(x)
    d = (np.abs(b).max(axis=1) / 127).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(len(d), np.float32), where=d != 0)
    q = np.clip(np.round(b * inv[:, None]), -127, 127).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1).tobytes()


def quantize_q4_0(x: np.ndarray) -> bytes:
    """Block: fp16 d, 16 bytes of nibbles; x = d * (q - 8)."""
    b = _blocks(x)
    d = (np.abs(b).max(axis=1) / 7).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(len(d), np.float32), where=d != 0)
    q = (np.clip(np.round(b * inv[:, None]), -8, 7) + 8).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1).tobytes()


def quantize_q4_1(x: np.ndarray) -> bytes:
    """Block: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m."""
    b = _blocks(x)
    m = b.min(axis=1).astype(np.float16)
    d = ((b.max(axis=1) - m.astype(np.float32)) / 15).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(len(d), np.float32), where=d != 0)
    q = np.clip(np.round((b - m.astype(np.float32)[:, None]) * inv[:, None]), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)], axis=1).tobytes()


def dequantize(type_name: str, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of stored bytes, per ggml's block layouts (the reference the reader must match)."""
    if type_name == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_name in ("F32", "F16"):
        return (
            np.frombuffer(data, dtype="<f4" if type_name == "F32" else "<f2")
            .astype(np.float32)
            .reshape(shape)
        )
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, GGML_TYPES[type_name][2])
    d = raw[:, 0:2].copy().view("<f2").astype(np.float32)
    if type_name == "Q8_0":
        q = raw[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    start = 4 if type_name == "Q4_1" else 2
    nibbles = raw[:, start:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
    if type_name == "Q4_0":
        return (d * (q - 8)).reshape(shape)
    m = raw[:, 2:4].copy().view("<f2").astype(np.float32)
    return (d * q + m).reshape(shape)


def tensor(x: np.ndarray, type_name: str = "F32") -> Tensor:
    """Store ``x`` (row-major, HF shape) as ``type_name``."""
    x = np.asarray(x, dtype=np.float32)
    encoders = {
        "F32": lambda a: a.astype("<f4").tobytes(),
        "F16": lambda a: a.astype("<f2").tobytes(),
        "BF16": lambda a: (a.view(np.uint32) >> 16).astype("<u2").tobytes(),  # truncation is enough here
        "Q8_0": quantize_q8_0,
        "Q4_0": quantize_q4_0,
        "Q4_1": quantize_q4_1,
    }
    return Tensor(type_name, x.shape, encoders[type_name](x))


def raw_tensor(type_name: str, shape: tuple[int, ...]) -> Tensor:
    """A tensor of any listed type with zero bytes of the right size (for types we only refuse)."""
    _, per_block, block_bytes = GGML_TYPES[type_name]
    return Tensor(type_name, shape, bytes(int(np.prod(shape)) // per_block * block_bytes))


# --- file writing -------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return UINT32 if 0 <= value < 2**32 else INT64
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return ARRAY
    raise TypeError(f"no GGUF type for {value!r}")


def _array(values: list | tuple | np.ndarray) -> bytes:
    if isinstance(values, np.ndarray):
        item = _NUMPY_VALUE_TYPES[values.dtype]
        return struct.pack("<IQ", item, len(values)) + values.astype(values.dtype.newbyteorder("<")).tobytes()
    item = _value_type(values[0]) if len(values) else INT32
    if item == UINT32 and all(isinstance(v, int) for v in values):
        item = INT32  # llama.cpp stores token types as int32
    return struct.pack("<IQ", item, len(values)) + b"".join(_value(item, v) for v in values)


def _value(value_type: int, value: Any) -> bytes:
    if value_type == STRING:
        return _string(value)
    if value_type == ARRAY:
        return _array(value)
    return struct.pack(_FORMATS[value_type], value)


def write_gguf(
    path: str | Path,
    metadata: dict[str, Any],
    tensors: dict[str, Tensor],
    alignment: int = 32,
    version: int = 3,
) -> Path:
    """Write a GGUF file: python str/int/float/bool/lists/numpy arrays become typed metadata."""
    header = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        value_type = _value_type(value)
        header += _string(key) + struct.pack("<I", value_type) + _value(value_type, value)
    data = bytearray()
    for name, t in tensors.items():
        type_id = GGML_TYPES[t.type][0]
        dims = tuple(reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        header += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, len(data))
        data += t.data + bytes(-len(t.data) % alignment)
    header += bytes(-len(header) % alignment)
    path = Path(path)
    path.write_bytes(bytes(header) + bytes(data))
    return path
