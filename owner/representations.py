"""Server side of `Represent`: many small concurrent requests folded into one forward of the full model.

Each caller submits token ids and waits on a future; one worker thread takes the first waiting request, gathers
whatever else arrives within REPRESENT_WINDOW_SECONDS (up to REPRESENT_BATCH requests), runs them as one padded
batch, and hands each caller its own rows. A single caller sees no wait beyond the window.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..common.contract import REPRESENT_BATCH, REPRESENT_WINDOW_SECONDS
from ..common.pema.representation import LocalRepresenter


@dataclass
class Represented:
    hidden: torch.Tensor  # [positions, hidden], fp32, before the final norm
    log_probs: torch.Tensor  # [positions, vocab], fp32


class RepresentationBatcher:
    def __init__(self, model: PreTrainedModel, batch: int = REPRESENT_BATCH, window: float = REPRESENT_WINDOW_SECONDS):
        self.representer = LocalRepresenter(model)
        self.batch, self.window = batch, window
        self._queue: queue.Queue[tuple[list[int], Future[Represented]]] = queue.Queue()
        self.batches_run = 0
        self._worker = threading.Thread(target=self._run, name="represent-batcher", daemon=True)
        self._worker.start()

    def submit(self, ids: list[int]) -> Future[Represented]:
        future: Future[Represented] = Future()
        self._queue.put((ids, future))
        return future

    def represent(self, ids: list[int]) -> Represented:
        return self.submit(ids).result()

    def _run(self) -> None:
        while True:
            pending = [self._queue.get()]
            with contextlib.suppress(queue.Empty):  # the window closed before the batch filled
                while len(pending) < self.batch:
                    pending.append(self._queue.get(timeout=self.window))
            try:
                states, logits = self.representer.forward([ids for ids, _ in pending])
                self.batches_run += 1
                for (_, future), state, row_logits in zip(pending, states, logits, strict=True):
                    future.set_result(Represented(state, torch.log_softmax(row_logits, dim=-1)))
            except Exception as error:  # the callers, not this thread, must see a failure
                for _, future in pending:
                    future.set_exception(error)
