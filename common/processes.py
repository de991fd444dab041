"""Which process this is under `accelerate launch`: rank 0 alone writes files and prints; a plain run is rank 0."""

from __future__ import annotations

from accelerate import PartialState


def is_main_process() -> bool:
    """True in a plain run and on rank 0 of `accelerate launch`: the one process that writes files and prints."""
    return PartialState().is_main_process


def process_count() -> int:
    return PartialState().num_processes


def wait_for_everyone() -> None:
    PartialState().wait_for_everyone()
