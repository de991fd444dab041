"""The model queue: every forward of the full model runs on a few threads of its own, never on the gRPC threads.

A job is one model call (an evaluation, a generation, one Represent request) written as an iterator of steps: one
batch, one token, one forward. A worker runs one step, hands its result to the job's reader, and takes the next
turn. Turns go round-robin across tenants, so a tenant's burst waits behind every other tenant's next step, never
the other way round. A job whose last result its reader has not taken yet waits out of turn: a slow reader holds
its admission, but no worker.

Admission is bounded per tenant and in all. Past either bound `admit` refuses at once (ModelQueueFull, sent as
RESOURCE_EXHAUSTED with a retry hint); nothing waits unbounded. A job whose call ended is dropped while it waits,
and stops after the step it is running; `cancel` returns only once no step of the job is running.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, TypeVar

from .limits import (
    MODEL_QUEUE_PER_TENANT,
    MODEL_QUEUE_TOTAL,
    MODEL_RETRY_MIN_SECONDS,
    MODEL_WORKERS,
    LimitExceeded,
)

CANCEL_POLL_SECONDS = 0.1  # how soon a reader waiting on the model notices that its call ended
JOB_SECONDS_WEIGHT = 0.2  # of the newest job in the running mean of job durations, the retry hint
Result = TypeVar("Result")


class ModelQueueFull(LimitExceeded):
    """The tenant's share of the model queue, or the whole queue, is taken; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class CallEnded(Exception):
    """The call ended before its job gave a result: there is no one left to give it to."""


class _State(enum.Enum):
    ADMITTED = "admitted"  # holds a slot, has no steps yet
    WAITING = "waiting"  # in its tenant's line for a worker
    RUNNING = "running"  # a worker is running one of its steps
    READY = "ready"  # a step's result waits for the reader, which puts the job back in line when it takes it
    CLOSING = "closing"  # cancelled: its steps are being closed
    DONE = "done"


class Job:
    """One admitted model call. Give it its steps with `stream` (many results) or `call` (one), or `cancel` it."""

    def __init__(self, queue: ModelQueue, tenant: str, stop: threading.Event | None):
        self.queue, self.tenant = queue, tenant
        self.stop = stop or threading.Event()  # set when the call ends, however it ends
        self.state = _State.ADMITTED
        self.admitted = time.monotonic()
        self.steps: Iterator[Any] = iter(())
        self.changed = threading.Condition(queue.lock)
        self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None

    def stream(self, steps: Iterator[Result]) -> Iterator[Result]:
        """Queues the steps and returns their results; closing the returned iterator cancels the job."""
        self.queue.start(self, steps)
        return self._results()

    def call(self, work: Callable[[], Result]) -> Result:
        """Runs `work` as the job's one step and returns what it returns; CallEnded when the call ends first."""
        with closing(self.stream(_once(work))) as results:
            for result in results:
                return result
        raise CallEnded()

    def cancel(self) -> None:
        self.queue.cancel(self)

    def _results(self) -> Iterator[Any]:
        try:
            while True:
                taken, result = self.queue.take(self)
                if not taken:
                    return
                yield result
        finally:
            self.cancel()


def _once(work: Callable[[], Result]) -> Iterator[Result]:
    yield work()


class ModelQueue:
    def __init__(
        self, workers: int = MODEL_WORKERS, per_tenant: int = MODEL_QUEUE_PER_TENANT, total: int = MODEL_QUEUE_TOTAL
    ):
        if min(workers, per_tenant, total) < 1:
            raise ValueError("the model queue needs at least one worker and room for one call per tenant and in all")
        self.workers, self.per_tenant, self.total = workers, per_tenant, total
        self.lock = threading.Lock()
        self._lines: dict[str, deque[Job]] = {}  # tenant -> its jobs waiting for a worker, oldest first
        self._turns: deque[str] = deque()  # the tenants with a job waiting, the next turn's first
        self._admitted: Counter[str] = Counter()  # kept at zero once seen: the gauge shows idle tenants as 0
        self._threads = 0
        self._job_seconds = 0.0

    def admit(self, tenant: str, stop: threading.Event | None = None) -> Job:
        """A slot for one model call of `tenant`, or ModelQueueFull at once. `stop`: set when the call ends."""
        with self.lock:
            retry = max(MODEL_RETRY_MIN_SECONDS, self._job_seconds)
            if self._admitted[tenant] >= self.per_tenant:
                raise ModelQueueFull(
                    f"tenant {tenant} has {self._admitted[tenant]} model calls queued or running, its limit "
                    f"(model_queue_per_tenant); retry in {math.ceil(retry)} s",
                    retry,
                )
            if self._admitted.total() >= self.total:
                raise ModelQueueFull(
                    f"the owner's model queue holds {self.total} calls, its limit (model_queue_total); retry in "
                    f"{math.ceil(retry)} s",
                    retry,
                )
            self._admitted[tenant] += 1
        return Job(self, tenant, stop)

    def depths(self) -> dict[str, int]:
        """Model calls admitted per tenant: waiting, running, or holding a result for their reader."""
        with self.lock:
            return dict(self._admitted)

    def start(self, job: Job, steps: Iterator[Any]) -> None:
        with self.lock:
            if job.state is not _State.ADMITTED:
                raise RuntimeError(f"a model job is started once; this one is {job.state.value}")
            job.steps = steps
            self._enqueue(job)

    def take(self, job: Job) -> tuple[bool, Any]:
        """(True, the next result), or (False, None) when the steps are over or the call ended; a step's error."""
        with job.changed:
            while job.state in (_State.WAITING, _State.RUNNING) and not job.stop.is_set():
                job.changed.wait(CANCEL_POLL_SECONDS)
            if job.error is not None:
                raise job.error
            if job.state is not _State.READY or job.stop.is_set():
                return False, None
            result, job.result = job.result, None
            self._enqueue(job)  # its next step takes a turn only now: results never pile up unread
            return True, result

    def cancel(self, job: Job) -> None:
        """Drops a waiting job, stops a running one after its step, and returns when none of its steps runs."""
        with job.changed:
            if job.state is _State.RUNNING:
                job.cancelled = True  # the worker closes it after this step
            elif job.state is _State.WAITING:
                self._leave_line(job)
            while job.state in (_State.RUNNING, _State.CLOSING):
                job.changed.wait()
            if job.state is _State.DONE:
                return
            job.state = _State.CLOSING
        self._close(job)

    def _enqueue(self, job: Job) -> None:
        """Puts the job at the end of its tenant's line, and the tenant in the turns if it was not; under the lock."""
        line = self._lines.setdefault(job.tenant, deque())
        if not line:
            self._turns.append(job.tenant)
        line.append(job)
        job.state = _State.WAITING
        if self._threads < self.workers:
            self._threads += 1
            threading.Thread(target=self._work, name="model-worker", daemon=True).start()

    def _leave_line(self, job: Job) -> None:
        line = self._lines[job.tenant]
        line.remove(job)
        if not line:
            del self._lines[job.tenant]
            self._turns.remove(job.tenant)

    def _next(self) -> Job | None:
        """The first waiting job of the tenant whose turn it is; that tenant's next turn comes after the others'."""
        if not self._turns:
            return None
        tenant = self._turns.popleft()
        line = self._lines[tenant]
        job = line.popleft()
        if line:
            self._turns.append(tenant)
        else:
            del self._lines[tenant]
        return job

    def _work(self) -> None:
        """A worker: runs one step of the next job in turn, until no job waits (a new one starts a worker again)."""
        while True:
            with self.lock:
                job = self._next()
                if job is None:
                    self._threads -= 1
                    return
                dropped = job.stop.is_set()  # its call ended while it waited: closed, never run
                job.state = _State.CLOSING if dropped else _State.RUNNING
            if dropped:
                self._close(job)
            else:
                self._step(job)

    def _step(self, job: Job) -> None:
        finished, result, error = False, None, None
        try:
            result = next(job.steps)
        except StopIteration:
            finished = True
        except BaseException as raised:  # handed to the reader, which re-raises it on its own thread
            error = raised
        with job.changed:
            if job.cancelled or job.stop.is_set():
                job.state = _State.CLOSING
            elif error is not None or finished:
                job.error = error
                self._finish(job)
                return
            else:
                job.result, job.state = result, _State.READY
                job.changed.notify_all()
                return
        self._close(job)

    def _close(self, job: Job) -> None:
        """Closes the steps of a job in CLOSING, outside the lock (their cleanup may take a while), then finishes it."""
        close = getattr(job.steps, "close", None)
        try:
            if close is not None:
                close()
        finally:
            with job.changed:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        """Frees the job's slot and wakes whoever waits on it; under the lock."""
        job.state = _State.DONE
        self._admitted[job.tenant] -= 1
        seconds = time.monotonic() - job.admitted
        self._job_seconds += JOB_SECONDS_WEIGHT * (seconds - self._job_seconds)
        job.changed.notify_all()
