"""PEMA hyper-parameters; the defaults are the reference code's."""

from __future__ import annotations

from dataclasses import dataclass

GRADUAL = "gradual"
CONSTANT = "constant"
SCHEDULES = (GRADUAL, CONSTANT)


@dataclass(frozen=True)
class PemaConfig:
    rank: int = 512
    dropout: float = 0.2
    kappa: float = 0.2  # weight of the reconstruction term in phase 2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 20
    patience: int = 2  # epochs without a better validation loss before stopping
    validation_fraction: float = 0.1
    lambda_max: float = 0.9
    schedule: str = GRADUAL
    seed: int = 0

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError("PEMA rank must be positive")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError("kappa must lie in [0, 1]")
        if not 0.0 <= self.lambda_max <= 1.0:
            raise ValueError("lambda_max must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must lie in (0, 1)")
