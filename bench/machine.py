"""What a benchmark's figures were measured on, in words."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine() -> str:
    """The CPU's model and the torch threads, and the GPU where one is there: what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    text = f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    return f"{text}; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else text
