"""Graceful drain: once shutdown begins, new calls are refused with UNAVAILABLE while those in flight finish.

gRPC's own `server.stop(grace)` answers a call that arrives during the grace period with CANCELLED or lets it time
out, depending on timing; a client cannot tell that from a real failure. Refusing at the handler, under the same
lock that counts calls in flight, makes every call either counted (and waited for) or refused (and retryable).
Health checks pass untouched: a balancer must keep seeing NOT_SERVING while the drain lasts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .audit import rewrap_handler, streaming

EXEMPT_PREFIX = "/grpc.health.v1.Health/"
REFUSAL = "the owner is shutting down; retry the call (another replica, or this one once it is back)"


class Drain(grpc.ServerInterceptor):
    """Counts calls in flight; after `begin`, refuses new ones and lets `wait_idle` wait for the rest."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._in_flight = 0
        self._draining = False

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def begin(self) -> None:
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight; False if `timeout` seconds pass first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)

    def _enter(self) -> bool:
        with self._lock:
            if self._draining:
                return False
            self._in_flight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        response_streaming = streaming(handler)[1]
        return rewrap_handler(handler, lambda behavior: self._wrap(behavior, response_streaming))

    def _wrap(self, behavior: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._enter():
                context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)
            if not response_streaming:
                try:
                    return behavior(request, context)
                finally:
                    self._leave()
            try:
                responses = behavior(request, context)
            except BaseException:
                self._leave()
                raise
            return self._until_done(responses)

        return counted

    def _until_done(self, responses: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from responses
        finally:
            self._leave()
