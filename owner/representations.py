"""Server side of `Represent`: concurrent requests folded into one forward of the full model.

Each request is submitted as pending, then run as one step of its call's model-queue job (owner/model_queue.py).
Whichever pending request's turn comes first takes up to REPRESENT_BATCH - 1 others along into one padded batch and
hands each its own rows; the others' turns then find their answer ready. While the model is busy requests pile up
and fold together; an idle model runs a lone request at once, with no wait for company.

The LM head runs only on the positions whose log-probs a caller asked for: over a large vocabulary, logits for every
position of a batch would cost far more memory than the forward itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..common.architectures import blocks
from ..common.contract import REPRESENT_BATCH
from ..common.model_loading import input_device
from ..common.scoring import causal_model

NO_LOG_PROBS, LAST_LOG_PROBS, ALL_LOG_PROBS = "none", "last", "all"  # where a request wants log-probs


@dataclass
class Represented:
    hidden: torch.Tensor  # [positions, hidden], fp32, before the final norm
    log_probs: torch.Tensor | None  # [positions asked for, vocab], fp32; None when none were asked for


@dataclass(eq=False)  # a request is itself, whatever its ids: the pending list is searched by identity
class PendingRepresentation:
    ids: list[int]
    log_probs_at: str
    future: Future[Represented] = field(default_factory=Future)


class RepresentationBatcher:
    def __init__(self, model: PreTrainedModel, batch: int = REPRESENT_BATCH):
        self.model = model.eval()
        self.batch = batch
        self._pending: list[PendingRepresentation] = []  # oldest first
        self._lock = threading.Lock()
        self.batches_run = 0

    @contextmanager
    def pending(self, ids: list[int], log_probs_at: str = NO_LOG_PROBS) -> Iterator[PendingRepresentation]:
        """A request other batches may take along until `run` answers it; withdrawn on exit if none did."""
        request = PendingRepresentation(ids, log_probs_at)
        with self._lock:
            self._pending.append(request)
        try:
            yield request
        finally:
            with self._lock:
                if request in self._pending:
                    self._pending.remove(request)

    def run(self, request: PendingRepresentation) -> Represented:
        """The request's answer: from a batch that already took it, or from one it leads with the oldest pending."""
        with self._lock:
            batch = []
            if request in self._pending:
                self._pending.remove(request)
                batch = [request, *self._pending[: self.batch - 1]]
                del self._pending[: self.batch - 1]
        if batch:
            try:
                results = self._forward(batch)
                self.batches_run += 1
                for taken, result in zip(batch, results, strict=True):
                    taken.future.set_result(result)
            except Exception as error:  # every request of the batch must see the failure, not only this one
                for taken in batch:
                    taken.future.set_exception(error)
        return request.future.result()

    @torch.no_grad()
    def _forward(self, requests: list[PendingRepresentation]) -> list[Represented]:
        """Pre-norm states of every position; log-probs only where asked, from the normed states."""
        captured: list[torch.Tensor] = []
        handle = blocks(self.model)[-1].register_forward_hook(
            lambda _m, _a, output: captured.append(output[0] if isinstance(output, tuple) else output)
        )
        width = max(len(r.ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for row, request in enumerate(requests):  # right padding keeps positions 0..len-1 as they are alone
            ids[row, : len(request.ids)] = torch.tensor(request.ids, dtype=torch.long)
            mask[row, : len(request.ids)] = 1
        causal = causal_model(self.model)
        device = input_device(causal)
        try:
            normed = causal.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
        finally:
            handle.remove()
        head = causal.get_output_embeddings()
        results = []
        for row, request in enumerate(requests):
            length = len(request.ids)
            log_probs = None
            if request.log_probs_at != NO_LOG_PROBS:
                first = length - 1 if request.log_probs_at == LAST_LOG_PROBS else 0
                log_probs = torch.log_softmax(head(normed[row, first:length]).float(), dim=-1).cpu()
            results.append(Represented(captured[-1][row, :length].float().cpu(), log_probs))
        return results
