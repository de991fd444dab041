"""Faults: the daemon SIGKILLed in the middle of a push, and a pull whose stream drops half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import TINY_LAYOUT, InProcessOwner, free_port, sentiment_examples
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offsite.client.connection import Remote, RemoteError
from offsite.client.pull import pull_emulator
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.manifest import read_manifest, sha256_file
from offsite.common.rpc import pb
from offsite.owner.store import Store


def _start_daemon(model_dir: Path, store: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "offsite.owner", "serve", "--model", str(model_dir), "--store", str(store)]
    command += ["--listen", f"127.0.0.1:{port}", "--emulator", f"uniform:{TINY_LAYOUT}", "--json", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    while line and not line.startswith("{"):
        line = process.stdout.readline()
    if not line.startswith("{"):
        raise AssertionError(f"daemon did not start: {process.stderr.read() if process.stderr else ''}")
    return process, json.loads(line)["address"]


def test_sigterm_turns_health_not_serving_before_it_stops_taking_calls(tiny_model_dir, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    token = store.add_tenant("alice")
    store.close()
    process, address = _start_daemon(tiny_model_dir("llama"), tmp_path / "store", "--shutdown-notice-seconds", "3")
    try:
        with grpc.insecure_channel(address) as channel, Remote(address, token, timeout=10) as remote:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            status = check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # the balancer's cue to stop routing here
            assert remote.model_card().model_name  # while the notice lasts, calls are still answered
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _push_messages(adapter: Path, paused: threading.Event, resume: threading.Event) -> Iterator[pb.PushAdapterRequest]:
    """The real adapter's header and first bytes, then a stall, as if the network hung mid-upload."""
    manifest = read_manifest(adapter)
    names = [*sorted(manifest["files"]), "offsite.json"]
    entries = [pb.FileEntry(name=n, size=(adapter / n).stat().st_size, sha256=sha256_file(adapter / n)) for n in names]
    yield pb.PushAdapterRequest(header=pb.PushAdapterHeader(emulator=manifest["emulator"], files=entries))
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    yield pb.PushAdapterRequest(chunk=pb.FileChunk(file="adapter_model.safetensors", offset=0, data=weights[:1024]))
    paused.set()
    resume.wait(60)


def test_sigkill_in_the_middle_of_a_push_leaves_a_consistent_registry(tiny_model_dir, tmp_path: Path) -> None:
    model_dir, store_dir = tiny_model_dir("llama"), tmp_path / "store"
    store = Store(store_dir)
    token = store.add_tenant("alice")
    store.close()
    process, address = _start_daemon(model_dir, store_dir)
    try:
        with Remote(address, token) as remote:
            pull_emulator(remote, tmp_path / "emulator", show_progress=False)
        adapter = tmp_path / "adapter"
        config = TrainConfig(epochs=1, learning_rate=1e-2)
        train_adapter(tmp_path / "emulator", sentiment_examples(16), config, adapter, show_progress=False)

        paused, resume = threading.Event(), threading.Event()
        outcome: list[BaseException] = []

        def push() -> None:
            with Remote(address, token, timeout=60) as remote:
                try:
                    remote.push(_push_messages(adapter, paused, resume))
                except RemoteError as error:
                    outcome.append(error)

        pusher = threading.Thread(target=push)
        pusher.start()
        assert paused.wait(60)
        deadline = time.monotonic() + 30
        while not any((store_dir / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        staged = list((store_dir / "tmp").iterdir())
        assert staged, "the push never reached the owner's staging area"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        resume.set()
        pusher.join(60)
        assert outcome and outcome[0].code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert staged[0].exists(), "SIGKILL leaves the half-written upload on disk"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)

    process, address = _start_daemon(model_dir, store_dir)
    try:
        assert list((store_dir / "tmp").iterdir()) == [], "recovery removed the partial upload"
        assert list((store_dir / "adapters").iterdir()) == []
        with Remote(address, token) as remote:
            assert list(remote.list_adapters().adapters) == []
            pushed = push_adapter(remote, adapter, show_progress=False)
            assert [a.adapter_id for a in remote.list_adapters().adapters] == [pushed.adapter_id]
    finally:
        process.terminate()
        process.wait(30)


class _Dropped(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection dropped (test)"


def test_a_pull_that_drops_half_way_resumes_and_verifies(
    owner: InProcessOwner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner.service.chunk_bytes = 16 * 1024  # many chunks per file, so a drop can fall inside
    offsets: list[int] = []
    dropped: set[str] = set()
    with owner.remote() as remote:
        real_pull = remote.pull

        def flaky_pull(artifact: str, name: str, offset: int) -> Iterator[pb.ArtifactChunk]:
            offsets.append(offset)
            for index, chunk in enumerate(real_pull(artifact, name, offset)):
                if index == 2 and name not in dropped:
                    dropped.add(name)
                    raise _Dropped()
                yield chunk

        monkeypatch.setattr(remote, "pull", flaky_pull)
        result = pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    assert "model.safetensors" in dropped
    assert 2 * 16 * 1024 in offsets, "the second request resumed at the offset where the first stopped"
    assert result["emulator"] == "uniform-1-2-1"
    assert not list((tmp_path / "emulator").glob("*.part"))


def _first_refusal(address: str, token: str, seconds: float) -> RemoteError | None:
    """The error of the first small call the daemon refuses within `seconds`, or None if it answered them all."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with Remote(address, token, timeout=5) as late:
                late.model_card()
        except RemoteError as error:
            return error
        time.sleep(0.1)
    return None


def test_sigterm_refuses_new_calls_drains_the_one_in_flight_and_exits(tiny_model_dir, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    token = store.add_tenant("alice")
    store.close()
    process, address = _start_daemon(tiny_model_dir("llama"), tmp_path / "store")
    release = threading.Event()

    def requests() -> Iterator[pb.RepresentRequest]:  # a call in flight until the test lets it send its second request
        yield pb.RepresentRequest(token_ids=[5, 6, 7])
        release.wait(60)
        yield pb.RepresentRequest(token_ids=[8, 9])

    try:
        with Remote(address, token, timeout=60) as remote:
            call = remote.stub.Represent(requests(), metadata=remote.metadata, timeout=60)
            first = next(call)
            process.send_signal(signal.SIGTERM)
            # the daemon's main thread wakes every 0.2 s to run the handler; a loaded machine may schedule it late
            refused = _first_refusal(address, token, seconds=20)
            assert refused is not None, "the daemon kept accepting new calls 20 s after SIGTERM"
            assert refused.code == grpc.StatusCode.UNAVAILABLE, refused  # retryable, unlike CANCELLED
            assert "shutting down" in str(refused), refused
            assert process.poll() is None, "the daemon exited with a call in flight"
            release.set()
            rest = list(call)  # the call in flight is answered to its end
        assert len(first.hidden) > 0 and len(rest) == 1
        assert process.wait(30) == 0
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_the_server_wide_stream_cap_is_a_serve_option(tiny_model_dir, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    alice, bob = store.add_tenant("alice"), store.add_tenant("bob")
    store.close()
    process, address = _start_daemon(
        tiny_model_dir("llama"), tmp_path / "store", "--max-streams-total", "1", "--unary-reserve", "1"
    )
    release = threading.Event()

    def held() -> Iterator[pb.RepresentRequest]:  # one request, then an idle stream that keeps its slot
        yield pb.RepresentRequest(token_ids=[5, 6, 7])
        release.wait(60)

    try:
        with Remote(address, alice, timeout=30) as first, Remote(address, bob, timeout=30) as second:
            call = first.stub.Represent(held(), metadata=first.metadata, timeout=30)
            next(call)
            with pytest.raises(grpc.RpcError) as refused:
                list(second.stub.Represent(iter([pb.RepresentRequest(token_ids=[5])]), metadata=second.metadata))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "serving 1 streaming calls" in refused.value.details()
            assert second.model_card().model_name  # the reserved thread still answers small calls
            release.set()
            call.cancel()
    finally:
        release.set()
        process.kill()
        process.wait(30)
