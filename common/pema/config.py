"""PEMA hyper-parameters. Where they differ from the released reference code, docs/pema.md says why."""

from __future__ import annotations

from dataclasses import dataclass

GRADUAL = "gradual"
CONSTANT = "constant"
GATE = "gate"
SCHEDULES = (GRADUAL, CONSTANT, GATE)
# Hybrid PEMA trains on keys + HYBRID_KEY_NOISE × the bridge's residual factor times N(0, I) (common/pema/training.py);
# the scale was chosen on E2E's held-out examples by the loss on the full model's states (bench/pema_key_noise.py)
HYBRID_KEY_NOISE = 1.0


@dataclass(frozen=True)
class PemaConfig:
    rank: int = 128  # a real bottleneck for d = 576 (the reference's 512 was for OPT's d = 2048)
    alpha: float = 1.0  # the output is scaled by alpha / rank, as in the reference's LoRA layer
    dropout: float = 0.2  # on the input state, as in the reference
    kappa: float = 0.2  # weight of the reconstruction term in phase 2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 20
    patience: int = 2  # epochs without a better validation loss before stopping
    validation_fraction: float = 0.1  # of the examples (whole sentences), never of the rows
    lambda_max: float = 0.9
    schedule: str = GRADUAL  # the default at generation; every adapter can be run with any schedule
    gate_width: int = 64  # hidden width of the learned mixing gate (0: no gate)
    length_predictor: bool = True  # fit the planned-length regressor that Gradual Unrolling uses
    seed: int = 0

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError("PEMA rank must be positive")
        if self.alpha <= 0:
            raise ValueError("alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must lie in [0, 1)")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError("kappa must lie in [0, 1]")
        if not 0.0 <= self.lambda_max <= 1.0:
            raise ValueError("lambda_max must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.schedule == GATE and self.gate_width < 1:
            raise ValueError("schedule 'gate' needs a gate (gate_width >= 1)")
        if self.gate_width < 0:
            raise ValueError("gate_width must be >= 0")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must lie in (0, 1)")
