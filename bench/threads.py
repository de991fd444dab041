"""Torch threads for the benchmarks' smoke runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread_if(smoke: bool) -> Iterator[None]:
    """A smoke run's tiny matrices gain nothing from more threads, only synchronisation; a real run keeps them."""
    threads = torch.get_num_threads()
    if smoke:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
