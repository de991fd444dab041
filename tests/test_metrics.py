"""Observability: Prometheus metrics over HTTP, per-RPC log lines that share the audit log's request id, the banner."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_LAYOUT, free_port
from prometheus_client.parser import text_string_to_metric_families

from offsite.client.connection import Remote, RemoteError
from offsite.common.model_loading import load_model
from offsite.common.rpc import pb
from offsite.owner.audit import RPC_LOGGER, JsonFormatter, RequestIdFilter, RpcLog
from offsite.owner.cli import render_banner
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.metrics import MetricsEndpoint, OwnerMetrics, serve_metrics
from offsite.owner.server import start_server
from offsite.owner.service import OwnerService
from offsite.owner.store import Store, new_record

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SERVICE = "offsite.v1.ModelOwner"


@dataclass
class Observed:
    store: Store
    address: str
    token: str
    metrics: OwnerMetrics
    endpoint: MetricsEndpoint


@pytest.fixture
def observed(tiny_model_dir, tmp_path: Path) -> Iterator[Observed]:
    store = Store(tmp_path / "store")
    token = store.add_tenant("alice")
    service = OwnerService(
        load_model(str(tiny_model_dir("llama"))), store, [EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")]
    )
    metrics = OwnerMetrics(store)
    metrics.offer({emulator_id: e.bytes for emulator_id, e in service.emulators.items()})
    server, port = start_server(service, store, "127.0.0.1:0", observers=[metrics, RpcLog()])
    endpoint = serve_metrics(metrics, "127.0.0.1", 0)
    yield Observed(store, f"127.0.0.1:{port}", token, metrics, endpoint)
    endpoint.close()
    server.stop(None)
    store.close()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str, kind: str = "unary") -> float:
    return value(
        samples, "grpc_server_handled_total", grpc_type=kind, grpc_service=SERVICE, grpc_method=method, grpc_code=code
    )


def test_the_metrics_endpoint_counts_calls_by_method_and_code(observed: Observed) -> None:
    before = scrape(observed.endpoint.url)
    with Remote(observed.address, observed.token) as remote:
        card = remote.model_card()
    with Remote(observed.address, "ofs_wrong") as stranger, pytest.raises(RemoteError):
        stranger.model_card()
    after = scrape(observed.endpoint.url)
    assert handled(after, "GetModelCard", "OK") == handled(before, "GetModelCard", "OK") + 1
    assert handled(after, "GetModelCard", "UNAUTHENTICATED") == 1
    method = {"grpc_service": SERVICE, "grpc_method": "GetModelCard"}
    assert value(after, "offsite_rpc_sent_bytes_total", **method) >= card.ByteSize()
    assert value(after, "grpc_server_handling_seconds_count", grpc_type="unary", **method) == 2
    assert value(after, "offsite_rpcs_in_flight", **method) == 0
    emulator = card.emulators[0]
    assert value(after, "offsite_emulator_bytes", emulator=emulator.id) == emulator.bytes
    assert value(after, "offsite_tenants") == 1 and value(after, "offsite_adapters_stored", tenant="alice") == 0


def test_streams_bytes_represent_tokens_and_stored_adapters(observed: Observed) -> None:
    requests = [pb.RepresentRequest(token_ids=[1, 2, 3]), pb.RepresentRequest(token_ids=[4, 5], last_only=True)]
    with Remote(observed.address, observed.token) as remote:
        card = remote.model_card()
        emulator = card.emulators[0]
        chunks = list(remote.pull(emulator.id, emulator.files[0], 0))
        responses = list(remote.represent(iter(requests)))
    assert len(responses) == 2
    with observed.store.staging() as staged:  # an adapter in the registry, as a push would leave it
        (staged / "adapter_model.safetensors").write_bytes(b"weights")
        observed.store.commit_adapter("alice", staged, new_record("alice", "a" * 64, "lora", emulator.id, 7, 1))
    samples = scrape(observed.endpoint.url)
    assert value(samples, "offsite_represent_tokens_total", tenant="alice") == 5
    represent = {"grpc_service": SERVICE, "grpc_method": "Represent"}
    assert handled(samples, "Represent", "OK", "bidi_stream") == 1
    assert value(samples, "grpc_server_msg_received_total", grpc_type="bidi_stream", **represent) == 2
    assert value(samples, "offsite_active_streams", **represent) == 0
    pull = {"grpc_service": SERVICE, "grpc_method": "PullArtifact"}
    assert handled(samples, "PullArtifact", "OK", "server_stream") == 1
    assert value(samples, "offsite_rpc_sent_bytes_total", **pull) >= sum(len(c.data) for c in chunks)
    assert value(samples, "offsite_adapters_stored", tenant="alice") == 1
    assert value(samples, "offsite_adapter_bytes_stored", tenant="alice") == 7


def test_a_failing_observer_does_not_fail_the_call(observed: Observed, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(observed.metrics, "sent", broken)
    with Remote(observed.address, observed.token) as remote:
        assert remote.model_card().emulators


def test_the_rpc_log_line_carries_the_audit_request_id_and_formats_as_json(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=RPC_LOGGER), Remote(observed.address, observed.token) as remote:
        remote.model_card()
        remote.list_adapters()
    audit = [json.loads(line) for line in (observed.store.root / "audit.jsonl").read_text().splitlines()]
    records = [r for r in caplog.records if r.name == RPC_LOGGER]
    assert [r.fields["request_id"] for r in records] == [line["request_id"] for line in audit]
    assert len({line["request_id"] for line in audit}) == len(audit) == 2
    formatted = json.loads(JsonFormatter().format(records[0]))
    assert formatted["request_id"] == audit[0]["request_id"] and formatted["tenant"] == "alice"
    assert formatted["status"] == "OK" and formatted["method"].endswith("/GetModelCard")
    assert formatted["level"] == "info" and observed.token not in json.dumps(formatted)


def test_records_outside_a_call_get_no_request_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    assert RequestIdFilter().filter(record) and record.request_id is None
    line = json.loads(JsonFormatter().format(record))
    assert set(line) == {"time", "level", "logger", "message"} and line["message"] == "hello there"


def test_serve_with_a_config_file_exposes_metrics_banner_and_json_logs(tiny_model_dir, tmp_path: Path) -> None:
    """The acceptance path: `offsite-owner serve --config FILE`, a call, `curl` on the metrics port."""
    store = tmp_path / "store"
    token = Store(store).add_tenant("alice")
    metrics_port = free_port()
    config = tmp_path / "owner.toml"
    config.write_text(
        f'model = "{tiny_model_dir("llama")}"\nstore = "store"\nlisten = "127.0.0.1:0"\n'
        f'emulator = ["uniform:{TINY_LAYOUT}"]\nmetrics_port = {metrics_port}\nlog_format = "json"\n'
        'device_map = "auto"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "offsite.owner", "serve", "--config", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        line = process.stdout.readline()
        while line and not line.startswith("{") and time.monotonic() < deadline:
            line = process.stdout.readline()
        assert line.startswith("{"), process.stderr.read() if process.stderr else ""
        ready = json.loads(line)
        assert ready["metrics_port"] == metrics_port
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = handled(scrape(url), "GetModelCard", "OK")
        with Remote(ready["address"], token) as remote:
            remote.model_card()
        assert handled(scrape(url), "GetModelCard", "OK") == before + 1
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    logged = [json.loads(text) for text in stderr.splitlines() if text.startswith("{")]
    banner = next(entry for entry in logged if entry.get("event") == "banner")
    assert banner["address"] == ready["address"] and banner["tls"] == "off"
    assert banner["metrics"] == url and banner["owner_public_key"] == ready["owner_public_key"]
    assert banner["emulators"][f"uniform-{TINY_LAYOUT}"]["bytes"] > 0
    assert banner["config"] == str(config)
    assert banner["devices"] == "cpu"  # device_map = "auto" reached accelerate
    audit = [json.loads(text) for text in (store / "audit.jsonl").read_text().splitlines()]
    card_call = next(entry for entry in audit if entry["method"].endswith("/GetModelCard"))
    assert any(entry.get("request_id") == card_call["request_id"] for entry in logged if "method" in entry)
    assert process.returncode == 0  # SIGTERM drains and exits cleanly


def test_the_text_banner_shows_what_an_operator_checks_first() -> None:
    fields = {
        "address": "127.0.0.1:50051",
        "model": "tiny",
        "architecture": "llama",
        "devices": "cuda:0 (20 modules), cuda:1 (14 modules)",
        "emulators": {"uniform-1-2-1": {"parameters": 12_345, "bytes": 3 * 1024 * 1024}},
        "owner_public_key": "ab" * 32,
        "tls": "off",
        "metrics": None,
        "log_format": "text",
        "audit_log": "/s/audit.jsonl",
        "config": None,
    }
    text = render_banner(fields)
    assert "127.0.0.1:50051" in text and "tiny (llama)" in text and "ab" * 32 in text
    assert "uniform-1-2-1: 12,345 parameters, 3.0 MiB" in text
    assert "cuda:0 (20 modules), cuda:1 (14 modules)" in text
    assert "metrics    off" in text and "TLS        off" in text
