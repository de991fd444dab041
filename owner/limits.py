"""Limits: per-tenant quotas (adapters, bytes, streams, Represent tokens per second) and the server's capacity.

The server's numbers are sized together so that no set of tenants can hang it. Every streaming call holds one worker
thread for as long as it lasts, so streams (all tenants together) may take at most MAX_STREAMS_TOTAL threads and
UNARY_RESERVE more stay free for health checks and small calls. Past WORKERS calls in flight, gRPC refuses at once
(RESOURCE_EXHAUSTED) instead of queueing calls behind threads that may never come free. A stream that waits on its
client for STREAM_IDLE_SECONDS, or runs for STREAM_MAX_SECONDS, is cancelled, so idle streams cannot hold slots.

Model forwards do not run on those threads: they queue for MODEL_WORKERS threads of their own (owner/model_queue.py),
at most MODEL_QUEUE_PER_TENANT calls per tenant and MODEL_QUEUE_TOTAL in all, so health checks and small calls
never wait behind a forward.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ..common.contract import (
    MAX_ADAPTERS_PER_TENANT,
    MAX_STREAMS_PER_TENANT,
    MAX_TENANT_BYTES,
    REPRESENT_TOKENS_PER_SECOND,
    STREAM_DEADLINE_SECONDS,
)

MAX_STREAMS_TOTAL = 16  # streaming calls in flight, all tenants together: 4 tenants at their limit
UNARY_RESERVE = 8  # worker threads streams can never take: health checks, model cards, listings
WORKERS = MAX_STREAMS_TOTAL + UNARY_RESERVE
STREAM_IDLE_SECONDS = 120.0  # waiting on the client (its next request, or room to send) for longer: cancelled
STREAM_MAX_SECONDS = STREAM_DEADLINE_SECONDS  # the client's own deadline on a stream, enforced here too
WATCHDOG_TICK_SECONDS = 1.0  # how often deadlines are checked, at most
# One forward at a time: torch spreads it over every core; a second would take the GIL from small calls twice as often
MODEL_WORKERS = 1
# Model calls admitted (waiting, running, or holding a result for their reader): one per model stream, so at the
# defaults the stream slots refuse first; lower these to bound how long a call may wait for the model
MODEL_QUEUE_PER_TENANT = MAX_STREAMS_PER_TENANT
MODEL_QUEUE_TOTAL = MAX_STREAMS_TOTAL
# How long a thread may hold the GIL before another waiting one gets it (Python's default: 5 ms). A small call needs
# the GIL a few times, and each wait behind a model worker's or a stream's Python costs up to this long: at 1 ms the
# in-daemon small-call p99 fell in each side-by-side run of bench/load.py, with no fewer client loops
GIL_SWITCH_MS = 1.0
MODEL_RETRY_MIN_SECONDS = 1.0  # the least retry hint of a full model queue: a slot rarely frees sooner

Item = TypeVar("Item")


class LimitExceeded(Exception):
    """A tenant went over one of its limits (RESOURCE_EXHAUSTED on the wire)."""


@dataclass(frozen=True)
class TenantLimits:
    max_adapters: int = MAX_ADAPTERS_PER_TENANT
    max_bytes: int = MAX_TENANT_BYTES
    max_streams: int = MAX_STREAMS_PER_TENANT
    represent_tokens_per_second: float = REPRESENT_TOKENS_PER_SECOND

    def check_quota(self, tenant: str, adapters: int, stored_bytes: int, incoming_bytes: int) -> None:
        """`adapters` and `stored_bytes` are what the tenant holds now; the new adapter brings `incoming_bytes`."""
        if adapters + 1 > self.max_adapters:
            raise LimitExceeded(
                f"tenant {tenant} holds {adapters} adapters, its quota is {self.max_adapters}; delete one first"
            )
        if stored_bytes + incoming_bytes > self.max_bytes:
            raise LimitExceeded(
                f"tenant {tenant} holds {stored_bytes} bytes of adapters; {incoming_bytes} more would pass its quota "
                f"of {self.max_bytes} bytes"
            )


@dataclass(frozen=True)
class ServerLimits:
    workers: int = WORKERS
    max_streams: int = MAX_STREAMS_TOTAL  # all tenants together; fewer than `workers`
    stream_idle_seconds: float = STREAM_IDLE_SECONDS
    stream_max_seconds: float = STREAM_MAX_SECONDS

    def __post_init__(self) -> None:
        if not 0 <= self.max_streams < self.workers:
            raise ValueError("streams must leave at least one worker thread free for unary calls and health checks")

    @property
    def max_concurrent_rpcs(self) -> int:
        return self.workers  # one thread each: a call past them would wait, maybe forever, so it is refused


class StreamSlots:
    """Counts streaming calls in flight, per tenant and in all, and refuses one over either limit."""

    def __init__(self, limit: int, total: int = MAX_STREAMS_TOTAL):
        self.limit, self.total = limit, total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        with self._lock:
            if self._open[tenant] >= self.limit:
                raise LimitExceeded(
                    f"tenant {tenant} already has {self._open[tenant]} streaming calls in flight; the limit is "
                    f"{self.limit}"
                )
            if self._open.total() >= self.total:
                raise LimitExceeded(f"the owner is serving {self.total} streaming calls, its limit; try again later")
            self._open[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._open[tenant] -= 1

    @contextmanager
    def held(self, tenant: str) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


class TokenRate:
    """A token bucket per tenant: `rate` tokens a second, bursts up to one second's worth; over it is refused."""

    def __init__(self, rate: float):
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens left, when)
        self._lock = threading.Lock()

    def take(self, tenant: str, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            left, when = self._buckets.get(tenant, (self.rate, now))
            left = min(self.rate, left + (now - when) * self.rate)
            if tokens > left:
                self._buckets[tenant] = (left, now)
                raise LimitExceeded(
                    f"tenant {tenant} asked for {tokens} tokens of representations; its rate of {self.rate:g} "
                    f"tokens/s leaves {int(left)} now"
                )
            self._buckets[tenant] = (left - tokens, now)


class BudgetExceeded(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class TokenBudget:
    """Positions each tenant may receive within a sliding window; past it, refused with when to retry."""

    def __init__(self, budget: int, window: float, clock: Callable[[], float] = time.monotonic):
        self.budget, self.window, self.clock = budget, window, clock
        self._spent: dict[str, deque[tuple[float, int]]] = {}  # tenant -> (when, positions), oldest first
        self._lock = threading.Lock()

    def take(self, tenant: str, tokens: int) -> None:
        if not self.budget:
            return
        if tokens > self.budget:
            raise BudgetExceeded(
                f"{tokens} positions are more than this owner's represent_token_budget of {self.budget} per "
                f"{self.window:g} s; send fewer tokens per request",
                self.window,
            )
        now = self.clock()
        with self._lock:
            spent = self._spent.setdefault(tenant, deque())
            while spent and spent[0][0] <= now - self.window:
                spent.popleft()
            used = sum(n for _, n in spent)
            if used + tokens <= self.budget:
                spent.append((now, tokens))
                return
            freed, retry = used + tokens - self.budget, self.window  # the oldest entries expire first
            for when, n in spent:
                freed -= n
                if freed <= 0:
                    retry = when + self.window - now
                    break
        raise BudgetExceeded(
            f"tenant {tenant} has received {used} of its {self.budget} Represent positions in the last "
            f"{self.window:g} s (represent_token_budget); retry in {retry:.0f} s",
            max(retry, 0.0),
        )


@dataclass(eq=False)
class StreamWatch:
    """One streaming call's clock: when it started, and since when it has been waiting on its client."""

    cancel: Callable[[], None]
    started: float = field(default_factory=time.monotonic)
    waiting_since: float | None = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None

    def requests(self, iterator: Iterator[Item]) -> Iterator[Item]:
        """`iterator`, with the wait for each item counted as idle."""
        while True:
            with self.waiting():
                item = next(iterator, None)
            if item is None:
                return
            yield item


class StreamDeadlines:
    """Cancels streaming calls idle (waiting on their client) past `idle` seconds, or running past `overall`.

    One watchdog thread serves every call; it runs only while some call is watched.
    """

    def __init__(self, idle: float = STREAM_IDLE_SECONDS, overall: float = STREAM_MAX_SECONDS):
        self.idle, self.overall = idle, overall
        self.tick = min(WATCHDOG_TICK_SECONDS, idle / 4, overall / 4)
        self._watches: set[StreamWatch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, cancel: Callable[[], None]) -> StreamWatch:
        watch = StreamWatch(cancel)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-deadlines", daemon=True)
                self._thread.start()
        return watch

    def forget(self, watch: StreamWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _expired(self, watch: StreamWatch, now: float) -> bool:
        waiting = watch.waiting_since
        return now - watch.started > self.overall or (waiting is not None and now - waiting > self.idle)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                expired = [w for w in self._watches if self._expired(w, now)]
                self._watches.difference_update(expired)
            for watch in expired:
                watch.cancel()
