"""Settings of one local training run; the defaults are the recipe `bench/transfer.py --select` chose.

The recipe, in one place: LoRA (r=8, α=16, dropout 0.05) on the emulator's adapter blocks, AdamW, a linear warm-up over
6% of the steps then cosine decay, loss on the answer tokens and the EOS after them only, prompts truncated from the
left with their BOS kept. `bench/transfer_recipe.json` records which learning rate and adapter blocks won on held-out
rows, and what the other candidates scored. `train_blocks="every"` (LoRA on every emulator block, its compressed
middle too) makes an adapter that only proxy-tuning can serve; bench/transfer_delivery.py chooses between it and the
recipe's adapter per task on held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...common.adapter_format import LORA

DEFAULT_LEARNING_RATE = {"lora": 1e-3, "full": 3e-5}
EVERY_BLOCK = "every"  # LoRA on every emulator block: an adapter for the emulator only, delivered by proxy-tuning
TRAIN_BLOCKS = ("all", "top", "bottom", EVERY_BLOCK)
DEFAULT_DP_DELTA = 1e-5  # fixed rather than 1/N: a δ derived from the data set would reveal its size
DEFAULT_DP_MAX_GRAD_NORM = 1.0  # C: each example's gradient is clipped to this L2 norm


@dataclass
class TrainConfig:
    method: str = LORA
    epochs: float = 2.0
    learning_rate: float | None = None  # None: the method's default
    batch_size: int = 8
    max_length: int = 256
    limit: int | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    warmup_fraction: float = 0.06
    seed: int = 0
    train_blocks: str = "top"  # all, top or bottom adapter blocks (the recipe: top), or every block of the emulator
    # Differential privacy (DP-SGD with Opacus): on when dp_epsilon is set; LoRA only
    dp_epsilon: float | None = None
    dp_delta: float = DEFAULT_DP_DELTA
    dp_max_grad_norm: float = DEFAULT_DP_MAX_GRAD_NORM
    record_examples: bool = False  # write the example count (and what reveals it) into the adapter's manifest

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.method]
