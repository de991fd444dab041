"""Settings of one local training run."""

from __future__ import annotations

from dataclasses import dataclass

from ...common.adapter_format import LORA

DEFAULT_LEARNING_RATE = {"lora": 5e-4, "full": 3e-5}
TRAIN_BLOCKS = ("all", "top", "bottom")


@dataclass
class TrainConfig:
    method: str = LORA
    epochs: float = 1.0
    learning_rate: float | None = None  # None: the method's default
    batch_size: int = 8
    max_length: int = 256
    limit: int | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    warmup_fraction: float = 0.06
    seed: int = 0
    train_blocks: str = "all"  # all, top or bottom: which of the emulator's adapter blocks learn

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.method]
