"""The external memory: keys `f(c_i)` (N×d, fp16 or fp32) and values `y_i` (N gold next-token ids), memory-mapped.

On disk: `keys.npy`, `values.npy` (NumPy format, never pickled: loaded with allow_pickle=False) and `memory.json`.
It is PEMA's training data, not a kNN index: nothing searches it at inference. `memory.json` also records which
rows belong to which example (`example_rows`, consecutive) and which examples share a prompt (`example_groups`),
so that validation can hold out whole sentences and prompts, never prefixes of training sentences.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEYS_FILE = "keys.npy"
VALUES_FILE = "values.npy"
MEMORY_FILE = "memory.json"
KEY_DTYPES = {"float16": np.float16, "float32": np.float32}


class InvalidMemory(ValueError):
    """A memory directory that is incomplete or inconsistent."""


@dataclass
class Memory:
    keys: np.ndarray  # memory-mapped [N, d]
    values: np.ndarray  # memory-mapped [N]
    info: dict[str, Any]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.keys.shape[1])

    def examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first row, row count, prompt group) of every example, in row order."""
        lengths, groups = self.info.get("example_rows"), self.info.get("example_groups")
        if lengths is None or groups is None or len(lengths) != len(groups) or sum(lengths) != len(self):
            raise InvalidMemory("this memory does not record its examples (built by an older version): rebuild it")
        counts = np.asarray(lengths, dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]), counts, np.asarray(groups, dtype=np.int64)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(rows)  # sorted reads are sequential on disk
        return torch.from_numpy(np.asarray(self.keys[order], dtype=np.float32)), torch.from_numpy(
            np.asarray(self.values[order], dtype=np.int64)
        )

    @classmethod
    def open(cls, directory: Path) -> Memory:
        try:
            info = json.loads((directory / MEMORY_FILE).read_text())
            keys = np.load(directory / KEYS_FILE, mmap_mode="r", allow_pickle=False)
            values = np.load(directory / VALUES_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InvalidMemory(f"{directory} is not a complete memory: {error}") from None
        if keys.ndim != 2 or values.ndim != 1 or keys.shape[0] != values.shape[0]:
            raise InvalidMemory(f"{directory}: keys {keys.shape} and values {values.shape} do not pair up")
        if keys.dtype not in (np.float16, np.float32) or values.dtype != np.int32:
            raise InvalidMemory(f"{directory}: keys must be float16/float32 and values int32")
        return cls(keys, values, info)


class MemoryWriter:
    """Fills a memory of known size row by row; the directory appears whole, or not at all."""

    def __init__(self, out: Path, count: int, hidden_size: int, dtype: str, info: dict[str, Any]):
        if dtype not in KEY_DTYPES:
            raise ValueError(f"key dtype must be one of {', '.join(KEY_DTYPES)}")
        if count < 1:
            raise ValueError("the examples give no target tokens to remember")
        self.out, self.info = out, dict(info, count=count, hidden_size=hidden_size, key_dtype=dtype)
        self.partial = out.with_name(out.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.keys = np.lib.format.open_memmap(
            self.partial / KEYS_FILE, mode="w+", dtype=KEY_DTYPES[dtype], shape=(count, hidden_size)
        )
        self.values = np.lib.format.open_memmap(self.partial / VALUES_FILE, mode="w+", dtype=np.int32, shape=(count,))
        self.filled = 0
        self.example_rows: list[int] = []
        self.example_groups: list[int] = []

    def add(self, keys: torch.Tensor, values: torch.Tensor, group: int) -> None:
        """One example's rows; examples with the same prompt share `group`."""
        end = self.filled + keys.shape[0]
        if end > self.values.shape[0]:
            raise InvalidMemory("more rows than the memory was sized for")
        self.keys[self.filled : end] = keys.detach().float().cpu().numpy()
        self.values[self.filled : end] = values.cpu().numpy().astype(np.int32)
        self.filled = end
        self.example_rows.append(int(keys.shape[0]))
        self.example_groups.append(int(group))

    def close(self) -> Memory:
        if self.filled != self.values.shape[0]:
            raise InvalidMemory(f"memory holds {self.filled} of {self.values.shape[0]} rows")
        self.keys.flush()
        self.values.flush()
        del self.keys, self.values
        info = {**self.info, "example_rows": self.example_rows, "example_groups": self.example_groups}
        (self.partial / MEMORY_FILE).write_text(json.dumps(info) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        self.partial.rename(self.out)
        return Memory.open(self.out)
