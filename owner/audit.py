"""Audit log: one JSON line per RPC with time, tenant, method, bytes in/out, status and duration; never payloads.

A server interceptor wraps every handler (health and reflection included), so no RPC escapes the log. The tenant
is known only after authentication, inside the servicer, which reports it with `note_tenant`.

The log is the owner's alone (0600), hash-chained and rotated by size (owner/audit_chain.py), and each line is
fsynced before the call's status is sent. A line that cannot be written is reported on stderr and the RPC goes on:
the audit trail must not become a way to take the service down.

The interceptor keeps one record per call (`Call`: request id, tenant, bytes, timing) and hands it to its observers:
the audit log, the per-RPC log line (`RpcLog`) and the Prometheus metrics (`metrics.OwnerMetrics`) all read that
one record, so they agree on every number and share one request id.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .audit_chain import ChainedLog, Rotation

REQUEST_ID_BYTES = 8  # 16 hex digits: unique enough to find one call in a day of logs
RPC_LOGGER = "offsite.owner.rpc"
QUIET_SERVICES = ("/grpc.health.v1.Health/",)  # probes every few seconds: logged at DEBUG, not INFO
TEXT_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


def new_request_id() -> str:
    return secrets.token_hex(REQUEST_ID_BYTES)


@dataclass
class Call:
    method: str  # /package.Service/Method
    peer: str
    request_streaming: bool = False
    response_streaming: bool = False
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    tenant: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def service_and_name(self) -> tuple[str, str]:
        service, _, name = self.method.lstrip("/").partition("/")
        return service, name

    @property
    def kind(self) -> str:
        """gRPC's four call types, spelled as go-grpc-prometheus labels them."""
        if self.request_streaming and self.response_streaming:
            return "bidi_stream"
        return "client_stream" if self.request_streaming else "server_stream" if self.response_streaming else "unary"


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("offsite_audit_call", default=None)


def current_request_id() -> str | None:
    call = _current.get()
    return call.request_id if call is not None else None


class CallObserver:
    """Sees every call the interceptor wraps; each hook is a no-op unless overridden. Hooks must be quick."""

    def started(self, call: Call) -> None:
        """Before the handler runs, once the call's method and peer are known (no default action)."""

    def received(self, call: Call, message: Any, size: int) -> None:
        """After each request message is read, with its serialized size (no default action)."""

    def sent(self, call: Call, message: Any, size: int) -> None:
        """After each response message is produced, with its serialized size (no default action)."""

    def finished(self, call: Call, status: grpc.StatusCode) -> None:
        """Once the call has ended, with its final status (no default action)."""


def note_tenant(tenant: str) -> None:
    """Called by authentication: the RPC in progress on this thread belongs to `tenant`."""
    call = _current.get()
    if call is not None:
        call.tenant = tenant


class AuditLog(CallObserver):
    def __init__(self, path: Path, rotation: Rotation | None = None):
        self.path = path
        self._chain = ChainedLog(path, rotation)

    def finished(self, call: Call, status: grpc.StatusCode) -> None:
        self.write(call, status)

    def write(self, call: Call, status: grpc.StatusCode) -> None:
        line = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": call.request_id,
            "tenant": call.tenant,
            "method": call.method,
            "peer": call.peer,
            "bytes_in": call.bytes_in,
            "bytes_out": call.bytes_out,
            "status": status.name,
            "duration_ms": round(call.seconds * 1000, 2),
        }
        try:
            self._chain.append(line)
        except OSError as error:
            log.error("audit log %s: could not record %s for %s: %s", self.path, call.method, call.tenant, error)


def streaming(handler: grpc.RpcMethodHandler) -> tuple[bool, bool]:
    """(request_streaming, response_streaming) of a handler."""
    return bool(handler.request_streaming), bool(handler.response_streaming)


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    serializes_responses: bool = False,
) -> grpc.RpcMethodHandler:
    """The same kind of handler, its behaviour replaced by `wrap(behaviour)`: how an interceptor wraps any RPC.

    `serializes_responses`: the wrapped behaviour returns (or yields) serialized bytes, which gRPC sends as they are.
    """
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return factory(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=None if serializes_responses else handler.response_serializer,
    )


def _already_bytes(message: bytes) -> bytes:
    """A handler without a serializer (a generic one) produces bytes already."""
    return message


def _status(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class AuditInterceptor(grpc.ServerInterceptor):
    """Wraps every handler; `log` (the audit log) sees each call first, then `observers` in order."""

    def __init__(self, log: AuditLog, observers: Sequence[CallObserver] = ()):
        self.log = log
        self.observers: tuple[CallObserver, ...] = (log, *observers)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        serialize = handler.response_serializer or _already_bytes
        return rewrap_handler(
            handler,
            lambda behavior: self._wrap(details.method, behavior, *streaming(handler), serialize),
            serializes_responses=True,
        )

    def _notify(self, hook: str, *arguments: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*arguments)
            except Exception:  # an observer's bug must not fail the call, as a failed audit write does not
                log.exception("%s.%s failed", type(observer).__name__, hook)

    def _wrap(
        self,
        method: str,
        behavior: Callable[..., Any],
        request_streaming: bool,
        response_streaming: bool,
        serialize: Callable[[Any], bytes],
    ) -> Callable[..., Any]:
        """Each response is serialized here, once, and its bytes counted: ByteSize would serialize it a second time."""
        notify = self._notify

        def received(call: Call, message: Any) -> None:
            size = message.ByteSize()
            call.bytes_in += size
            notify("received", call, message, size)

        def sent(call: Call, message: Any) -> bytes | None:
            data = serialize(message) if message is not None else None
            size = len(data) if data is not None else 0
            call.bytes_out += size
            notify("sent", call, message, size)
            return data

        def counted_requests(requests: Iterator[Any], call: Call) -> Iterator[Any]:
            for message in requests:
                received(call, message)
                yield message

        def counted_responses(responses: Iterator[Any], call: Call, context: grpc.ServicerContext) -> Iterator[Any]:
            reset = _current.set(call)  # the stream runs after the handler returned: keep the call current
            failed = True
            try:
                for message in responses:
                    yield sent(call, message)
                failed = False
            finally:
                notify("finished", call, _status(context, failed))
                _current.reset(reset)

        def audited(request: Any, context: grpc.ServicerContext) -> Any:
            call = Call(method, context.peer(), request_streaming, response_streaming)
            reset = _current.set(call)
            notify("started", call)
            try:
                if request_streaming:
                    request = counted_requests(request, call)
                else:
                    received(call, request)
                result = behavior(request, context)
                if response_streaming:
                    return counted_responses(result, call, context)
                data = sent(call, result)
                notify("finished", call, _status(context, False))
                return data
            except BaseException:
                notify("finished", call, _status(context, True))
                raise
            finally:
                _current.reset(reset)

        return audited


class RpcLog(CallObserver):
    """One log line per call, carrying the audit line's request id; health probes only at DEBUG."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger(RPC_LOGGER)

    def finished(self, call: Call, status: grpc.StatusCode) -> None:
        level = logging.DEBUG if call.method.startswith(QUIET_SERVICES) else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        fields = {
            "request_id": call.request_id,
            "method": call.method,
            "tenant": call.tenant,
            "peer": call.peer,
            "status": status.name,
            "duration_ms": round(call.seconds * 1000, 2),
            "bytes_in": call.bytes_in,
            "bytes_out": call.bytes_out,
        }
        self.logger.log(
            level,
            "%s %s tenant=%s %.1f ms in=%d out=%d id=%s",
            call.method,
            status.name,
            call.tenant or "-",
            fields["duration_ms"],
            call.bytes_in,
            call.bytes_out,
            call.request_id,
            extra={"fields": fields},
        )


class RequestIdFilter(logging.Filter):
    """Stamps each record made during a call with its request id, so any line can be matched to the audit log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, and a record's structured `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str = "text", level: str = "info") -> logging.Handler:
    """The daemon's stderr logging: human-readable text by default, or JSON lines; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return handler
