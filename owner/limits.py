"""Per-tenant limits: adapter quotas (count and bytes), concurrent streaming calls, Represent tokens per second."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..common.contract import (
    MAX_ADAPTERS_PER_TENANT,
    MAX_STREAMS_PER_TENANT,
    MAX_TENANT_BYTES,
    REPRESENT_TOKENS_PER_SECOND,
)


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


class StreamSlots:
    """Counts each tenant's streaming calls in flight and refuses one over the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        with self._lock:
            if self._open[tenant] >= self.limit:
                raise LimitExceeded(
                    f"tenant {tenant} already has {self._open[tenant]} streaming calls in flight; the limit is "
                    f"{self.limit}"
                )
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
