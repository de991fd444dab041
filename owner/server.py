"""Assembles the gRPC server: the ModelOwner service, standard health checking and reflection."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..common.addresses import is_loopback
from ..common.contract import MAX_MESSAGE_BYTES
from ..common.rpc import pb, pb_grpc
from .audit import AuditInterceptor, AuditLog, CallObserver
from .audit_chain import AUDIT_FILE, Rotation
from .drain import Drain
from .limits import ServerLimits
from .service import OwnerService
from .servicer import OwnerServicer
from .store import Store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelOwner"].full_name


class BindRefused(ValueError):
    """The daemon will not listen on that address as asked."""


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, every client must present a certificate this CA signed

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            root = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as error:
            raise BindRefused(f"cannot read a TLS file: {error}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def start_server(
    service: OwnerService,
    store: Store,
    listen: str,
    insecure: bool = False,
    tls: ServerTls | None = None,
    limits: ServerLimits | None = None,
    observers: Sequence[CallObserver] = (),
    audit_rotation: Rotation | None = None,
) -> tuple[grpc.Server, int]:
    """Starts serving on `listen` (HOST:PORT; port 0 picks a free one) and returns the server and port.

    `observers` (metrics, the per-RPC log) see every call after the audit log has recorded it.
    """
    limits = limits or ServerLimits()
    if tls is None and not is_loopback(listen) and not insecure:
        raise BindRefused(
            f"refusing to listen on {listen} without TLS: anyone on that network could read the traffic. "
            "Bind a loopback address, or pass --insecure to accept the risk."
        )
    drain = Drain()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers),
        # audit first, so that a call the drain refuses is still in the audit log
        interceptors=[AuditInterceptor(AuditLog(store.root / AUDIT_FILE, audit_rotation), observers), drain],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    pb_grpc.add_ModelOwnerServicer_to_server(OwnerServicer(service, store, limits), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _STOPPING[server] = (health_servicer, drain)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise BindRefused(f"could not bind {listen}")
    server.start()
    return server, port


# Each server's health service and drain, so that `shutdown` can turn health NOT_SERVING and drain the calls.
_STOPPING: weakref.WeakKeyDictionary[grpc.Server, tuple[health.HealthServicer, Drain]] = weakref.WeakKeyDictionary()

# After the drain, what gRPC gets to send the last calls' statuses before it cancels what is left.
STATUS_FLUSH_SECONDS = 1.0


def shutdown(server: grpc.Server, notice_seconds: float, grace_seconds: float) -> None:
    """Health turns NOT_SERVING at once, so that a load balancer stops sending calls; new calls are still served
    for `notice_seconds` (the balancer's polling interval), then refused with UNAVAILABLE while those in flight get
    `grace_seconds` to finish; then the server stops."""
    health_servicer, drain = _STOPPING.get(server, (None, None))
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    if notice_seconds > 0:
        time.sleep(notice_seconds)
    if drain is not None:
        drain.begin()
        if not drain.wait_idle(grace_seconds):
            log.warning("%d call(s) still in flight after %.0f s: cancelling them", drain.in_flight, grace_seconds)
    server.stop(STATUS_FLUSH_SECONDS).wait()
