"""The owner's representations over `Represent`: what `memory build --server` and remote PEMA generation use.

Every token id sent here reaches the model owner: the CLI says so and asks for `--yes` before it starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.rpc import pb
from ..common.wire_tensors import decode_tensor
from .connection import Remote


class RemoteRepresenter:
    def __init__(self, remote: Remote, hidden_size: int, dtype: str = "float32"):
        self.remote, self.hidden_size, self.dtype = remote, hidden_size, dtype

    def _hidden(self, response: pb.RepresentResponse) -> torch.Tensor:
        if response.hidden_size != self.hidden_size:
            raise ValueError(f"the owner sent hidden size {response.hidden_size}, expected {self.hidden_size}")
        shape = (response.positions, response.hidden_size)
        return decode_tensor(response.hidden, response.dtype, shape).float()

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        requests = (pb.RepresentRequest(token_ids=list(ids), dtype=self.dtype) for ids in sequences)
        states = [self._hidden(response) for response in self.remote.represent(requests)]
        if len(states) != len(sequences):
            raise ValueError(f"asked for {len(sequences)} representations, the owner sent {len(states)}")
        return states

    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        requests = (
            pb.RepresentRequest(token_ids=list(ids), dtype=self.dtype, log_probs="top_k", top_k=1, last_only=True)
            for ids in sequences
        )
        tokens = [int(decode_tensor(r.top_k_ids, "int32", (1, 1))) for r in self.remote.represent(requests)]
        if len(tokens) != len(sequences):
            raise ValueError(f"asked for {len(sequences)} next tokens, the owner sent {len(tokens)}")
        return tokens

    def last(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """[len(sequences), hidden]: f(x) at the last position of each, for one step of generation (the pulled head
        turns it into P_LM here)."""
        requests = (pb.RepresentRequest(token_ids=list(ids), dtype=self.dtype, last_only=True) for ids in sequences)
        states = [self._hidden(response)[-1] for response in self.remote.represent(requests)]
        if len(states) != len(sequences):
            raise ValueError(f"asked for {len(sequences)} representations, the owner sent {len(states)}")
        return torch.stack(states)
