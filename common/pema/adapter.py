"""The PEMA adapter: a down-projection `A` (d→r), a reconstruction decoder `B_rct` and a prediction decoder `B_pd`
(both r→d). Its next-token distribution is softmax(W_hd · norm(B_pd(A x))), with the owner's head and norm.

As in the reference's LoRA layer: dropout acts on the input state, the output is scaled by alpha / r, `A` starts
Kaiming-uniform and both decoders start at zero. Two optional parts ride along in the same bundle: the mixing gate
(gate.py) and the planned-length predictor (length.py).
"""

from __future__ import annotations

import math

import torch

from .gate import MixingGate
from .head import Head
from .length import LengthPredictor


class PemaAdapter(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        rank: int,
        dropout: float = 0.0,
        alpha: float = 1.0,
        gate_width: int = 0,
        length_predictor: bool = False,
    ):
        super().__init__()
        self.A = torch.nn.Linear(hidden_size, rank, bias=False)
        self.B_rct = torch.nn.Linear(rank, hidden_size, bias=False)
        self.B_pd = torch.nn.Linear(rank, hidden_size, bias=False)
        self.dropout = torch.nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.gate = MixingGate(hidden_size, gate_width) if gate_width else None
        self.length = LengthPredictor(hidden_size) if length_predictor else None
        torch.nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.B_rct.weight)
        torch.nn.init.zeros_(self.B_pd.weight)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.dropout(x)) * self.scaling

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.B_rct(self.latent(x))

    def predict_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.B_pd(self.latent(x))

    def log_probs(self, x: torch.Tensor, head: Head) -> torch.Tensor:
        return torch.log_softmax(head.logits(self.predict_hidden(x.float())), dim=-1)
