"""Audit log: one JSON line per RPC with time, tenant, method, bytes in/out, status and duration; never payloads.

A server interceptor wraps every handler (health and reflection included), so no RPC escapes the log. The tenant
is known only after authentication, inside the servicer, which reports it with `note_tenant`.

The log is the owner's alone (0600) and each line is fsynced before the call's status is sent. A line that cannot
be written is reported on stderr and the RPC goes on: the audit trail must not become a way to take the service down.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

AUDIT_FILE = "audit.jsonl"
AUDIT_MODE = 0o600

log = logging.getLogger(__name__)


@dataclass
class _Call:
    method: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    tenant: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("offsite_audit_call", default=None)


def note_tenant(tenant: str) -> None:
    """Called by authentication: the RPC in progress on this thread belongs to `tenant`."""
    call = _current.get()
    if call is not None:
        call.tenant = tenant


class AuditLog:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, call: _Call, status: grpc.StatusCode) -> None:
        line = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "tenant": call.tenant,
            "method": call.method,
            "peer": call.peer,
            "bytes_in": call.bytes_in,
            "bytes_out": call.bytes_out,
            "status": status.name,
            "duration_ms": round((time.monotonic() - call.started) * 1000, 2),
        }
        try:
            self._append((json.dumps(line) + "\n").encode())
        except OSError as error:
            log.error("audit log %s: could not record %s for %s: %s", self.path, call.method, call.tenant, error)

    def _append(self, data: bytes) -> None:
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, AUDIT_MODE)
            try:
                os.fchmod(descriptor, AUDIT_MODE)  # a log made before, or by hand, gets the owner-only mode too
                view = memoryview(data)
                while view:
                    view = view[os.write(descriptor, view) :]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def _status(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class AuditInterceptor(grpc.ServerInterceptor):
    def __init__(self, log: AuditLog):
        self.log = log

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        audited = self._wrap(details.method, behavior, handler.request_streaming, handler.response_streaming)
        return factory(
            audited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self, method: str, behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool
    ) -> Callable[..., Any]:
        log = self.log

        def counted_requests(requests: Iterator[Any], call: _Call) -> Iterator[Any]:
            for message in requests:
                call.bytes_in += message.ByteSize()
                yield message

        def counted_responses(responses: Iterator[Any], call: _Call, context: grpc.ServicerContext) -> Iterator[Any]:
            reset = _current.set(call)  # the stream runs after the handler returned: keep the call current
            failed = True
            try:
                for message in responses:
                    call.bytes_out += message.ByteSize()
                    yield message
                failed = False
            finally:
                log.write(call, _status(context, failed))
                _current.reset(reset)

        def audited(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(method, context.peer())
            reset = _current.set(call)
            try:
                if request_streaming:
                    request = counted_requests(request, call)
                else:
                    call.bytes_in = request.ByteSize()
                result = behavior(request, context)
                if response_streaming:
                    return counted_responses(result, call, context)
                call.bytes_out = result.ByteSize() if result is not None else 0
                log.write(call, _status(context, False))
                return result
            except BaseException:
                log.write(call, _status(context, True))
                raise
            finally:
                _current.reset(reset)

        return audited
