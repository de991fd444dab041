"""Prometheus metrics of the daemon, fed by the audit interceptor's per-call record (audit.Call).

RPC metrics use go-grpc-prometheus's names and labels (grpc_server_handled_total{grpc_service, grpc_method,
grpc_code, grpc_type} and friends), so existing gRPC dashboards and alerts work on them unchanged. The rest are
offsite_*: bytes in and out, streams in flight, Represent tokens served per tenant, and, read at each scrape,
adapters stored per tenant (from the store) and model calls queued per tenant (from the model queue).

Each OwnerMetrics has its own registry: several daemons in one process (tests) do not share counters.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..common.rpc import pb
from .audit import Call, CallObserver
from .model_queue import ModelQueue
from .store import Store

# Seconds: a model card takes milliseconds, a pull of a large emulator minutes, an evaluation on CPU hours
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
REPRESENT_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ModelOwner'].full_name}/Represent"
METRICS_PATH = "/metrics"  # prometheus_client serves every path; this is the one the docs and banner name

log = logging.getLogger(__name__)


class StoreCollector(Collector):
    """Adapters (count and bytes) and tenants, read from the registry when scraped, so they never go stale."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterable[Metric]:
        try:
            tenants = self.store.list_tenants()
        except sqlite3.Error as error:  # the store closing under a late scrape: report nothing rather than fail
            log.warning("metrics: cannot read the store: %s", error)
            return []
        adapters = GaugeMetricFamily("offsite_adapters_stored", "adapters in the store", labels=["tenant"])
        stored = GaugeMetricFamily("offsite_adapter_bytes_stored", "bytes of stored adapters", labels=["tenant"])
        for tenant in tenants:
            adapters.add_metric([tenant.name], tenant.adapters)
            stored.add_metric([tenant.name], tenant.bytes)
        return [adapters, stored, GaugeMetricFamily("offsite_tenants", "tenants registered", value=len(tenants))]


class ModelQueueCollector(Collector):
    """Model calls admitted per tenant (waiting, running, or holding a result for their reader), when scraped."""

    def __init__(self, model_queue: ModelQueue):
        self.model_queue = model_queue

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "offsite_model_queue_depth", "model calls queued or running, per tenant", labels=["tenant"]
        )
        for tenant, calls in sorted(self.model_queue.depths().items()):
            depth.add_metric([tenant], calls)
        return [depth]


class OwnerMetrics(CallObserver):
    def __init__(
        self,
        store: Store | None = None,
        registry: CollectorRegistry | None = None,
        model_queue: ModelQueue | None = None,
    ):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.started_calls = Counter("grpc_server_started", "RPCs started", RPC_LABELS, registry=r)
        self.handled = Counter("grpc_server_handled", "RPCs finished", (*RPC_LABELS, "grpc_code"), registry=r)
        self.latency = Histogram(
            "grpc_server_handling_seconds", "RPC duration", RPC_LABELS, buckets=LATENCY_BUCKETS, registry=r
        )
        self.messages_in = Counter("grpc_server_msg_received", "messages received", RPC_LABELS, registry=r)
        self.messages_out = Counter("grpc_server_msg_sent", "messages sent", RPC_LABELS, registry=r)
        method = ("grpc_service", "grpc_method")
        self.bytes_in = Counter("offsite_rpc_received_bytes", "serialized request bytes", method, registry=r)
        self.bytes_out = Counter("offsite_rpc_sent_bytes", "serialized response bytes", method, registry=r)
        self.in_flight = Gauge("offsite_rpcs_in_flight", "RPCs in progress", method, registry=r)
        self.active_streams = Gauge("offsite_active_streams", "streaming RPCs in progress", method, registry=r)
        self.represent_tokens = Counter(
            "offsite_represent_tokens", "tokens whose representations were sent", ("tenant",), registry=r
        )
        self.emulator_bytes = Gauge(
            "offsite_emulator_bytes", "size of each offered emulator", ("emulator",), registry=r
        )
        if store is not None:
            r.register(StoreCollector(store))
        if model_queue is not None:
            r.register(ModelQueueCollector(model_queue))
        # Represent: each response answers the oldest unanswered request, whose tokens it then counts
        self._pending: dict[str, deque[int]] = {}
        self._lock = threading.Lock()

    def offer(self, emulator_bytes: dict[str, int]) -> None:
        for emulator, size in emulator_bytes.items():
            self.emulator_bytes.labels(emulator).set(size)

    @staticmethod
    def _labels(call: Call) -> tuple[str, str, str]:
        return (call.kind, *call.service_and_name)

    def started(self, call: Call) -> None:
        self.started_calls.labels(*self._labels(call)).inc()
        method = call.service_and_name
        self.in_flight.labels(*method).inc()
        if call.request_streaming or call.response_streaming:
            self.active_streams.labels(*method).inc()

    def received(self, call: Call, message: Any, size: int) -> None:
        self.messages_in.labels(*self._labels(call)).inc()
        self.bytes_in.labels(*call.service_and_name).inc(size)
        if call.method == REPRESENT_METHOD:
            with self._lock:
                self._pending.setdefault(call.request_id, deque()).append(len(message.token_ids))

    def sent(self, call: Call, message: Any, size: int) -> None:
        self.messages_out.labels(*self._labels(call)).inc()
        self.bytes_out.labels(*call.service_and_name).inc(size)
        if call.method == REPRESENT_METHOD:
            with self._lock:
                pending = self._pending.get(call.request_id)
                tokens = pending.popleft() if pending else 0
            self.represent_tokens.labels(call.tenant or "").inc(tokens)

    def finished(self, call: Call, status: grpc.StatusCode) -> None:
        labels = self._labels(call)
        self.handled.labels(*labels, status.name).inc()
        self.latency.labels(*labels).observe(call.seconds)
        method = call.service_and_name
        self.in_flight.labels(*method).dec()
        if call.request_streaming or call.response_streaming:
            self.active_streams.labels(*method).dec()
        with self._lock:
            self._pending.pop(call.request_id, None)


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{METRICS_PATH}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(metrics: OwnerMetrics, host: str, port: int) -> MetricsEndpoint:
    """Serves `metrics` over HTTP on host:port in a daemon thread; port 0 picks a free one."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsEndpoint(server, thread, host, int(server.server_port))
