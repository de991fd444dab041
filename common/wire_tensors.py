"""Tensors as raw little-endian bytes on the wire (never pickle): what Represent sends and the client decodes."""

from __future__ import annotations

import sys

import torch

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().cpu()
    if sys.byteorder != "little":
        raise RuntimeError("offsite's wire tensors are little-endian; this machine is not")
    # bfloat16 has no NumPy dtype: view the 2-byte words as int16.
    raw = data.view(torch.int16) if data.dtype == torch.bfloat16 else data
    return raw.numpy().tobytes()


def decode_tensor(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Checks the byte count against `shape` before anything is built from untrusted bytes."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}")
    target = WIRE_DTYPES[dtype]
    width = torch.empty((), dtype=target).element_size()
    expected = width
    for size in shape:
        expected *= size
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes cannot be a {dtype} tensor of shape {shape} ({expected} bytes)")
    if expected == 0:
        return torch.empty(shape, dtype=target)
    storage = torch.frombuffer(bytearray(data), dtype=torch.int16 if target == torch.bfloat16 else target)
    return storage.view(target).reshape(shape).clone() if shape else storage.view(target).clone()
