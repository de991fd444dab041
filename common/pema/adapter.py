"""The PEMA adapter: a down-projection `A` (d→r), a reconstruction decoder `B_rct` and a prediction decoder `B_pd`
(both r→d). Its next-token distribution is softmax(W_hd · norm(B_pd(A x))), with the owner's head and norm."""

from __future__ import annotations

import torch

from .head import Head


class PemaAdapter(torch.nn.Module):
    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.A = torch.nn.Linear(hidden_size, rank, bias=False)
        self.B_rct = torch.nn.Linear(rank, hidden_size, bias=False)
        self.B_pd = torch.nn.Linear(rank, hidden_size, bias=False)
        self.dropout = torch.nn.Dropout(dropout)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.B_rct(self.dropout(self.A(x)))

    def predict_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.B_pd(self.dropout(self.A(x)))

    def log_probs(self, x: torch.Tensor, head: Head) -> torch.Tensor:
        return torch.log_softmax(head.logits(self.predict_hidden(x.float())), dim=-1)
