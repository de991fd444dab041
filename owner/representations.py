"""Server side of `Represent`: many small concurrent requests folded into one forward of the full model.

Each caller submits token ids and waits on a future; one worker thread takes the first waiting request, gathers
whatever else arrives within REPRESENT_WINDOW_SECONDS (up to REPRESENT_BATCH requests), runs them as one padded
batch, and hands each caller its own rows. A single caller sees no wait beyond the window.

The LM head runs only on the positions whose log-probs a caller asked for: over a large vocabulary, logits for every
position of a batch would cost far more memory than the forward itself.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..common.architectures import blocks
from ..common.contract import REPRESENT_BATCH, REPRESENT_WINDOW_SECONDS
from ..common.scoring import causal_model

NO_LOG_PROBS, LAST_LOG_PROBS, ALL_LOG_PROBS = "none", "last", "all"  # where a request wants log-probs


@dataclass
class Represented:
    hidden: torch.Tensor  # [positions, hidden], fp32, before the final norm
    log_probs: torch.Tensor | None  # [positions asked for, vocab], fp32; None when none were asked for


@dataclass
class _Request:
    ids: list[int]
    log_probs_at: str
    future: Future[Represented]


class RepresentationBatcher:
    def __init__(self, model: PreTrainedModel, batch: int = REPRESENT_BATCH, window: float = REPRESENT_WINDOW_SECONDS):
        self.model = model.eval()
        self.batch, self.window = batch, window
        self._queue: queue.Queue[_Request] = queue.Queue()
        self.batches_run = 0
        self._worker = threading.Thread(target=self._run, name="represent-batcher", daemon=True)
        self._worker.start()

    def submit(self, ids: list[int], log_probs_at: str = NO_LOG_PROBS) -> Future[Represented]:
        future: Future[Represented] = Future()
        self._queue.put(_Request(ids, log_probs_at, future))
        return future

    def represent(self, ids: list[int], log_probs_at: str = NO_LOG_PROBS) -> Represented:
        return self.submit(ids, log_probs_at).result()

    @torch.no_grad()
    def _forward(self, requests: list[_Request]) -> list[Represented]:
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
        try:
            normed = causal.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        finally:
            handle.remove()
        head = causal.get_output_embeddings()
        results = []
        for row, request in enumerate(requests):
            length = len(request.ids)
            log_probs = None
            if request.log_probs_at != NO_LOG_PROBS:
                first = length - 1 if request.log_probs_at == LAST_LOG_PROBS else 0
                log_probs = torch.log_softmax(head(normed[row, first:length]).float(), dim=-1)
            results.append(Represented(captured[-1][row, :length].float(), log_probs))
        return results

    def _run(self) -> None:
        while True:
            pending = [self._queue.get()]
            with contextlib.suppress(queue.Empty):  # the window closed before the batch filled
                while len(pending) < self.batch:
                    pending.append(self._queue.get(timeout=self.window))
            try:
                results = self._forward(pending)
                self.batches_run += 1
                for request, result in zip(pending, results, strict=True):
                    request.future.set_result(result)
            except Exception as error:  # the callers, not this thread, must see a failure
                for request in pending:
                    request.future.set_exception(error)
