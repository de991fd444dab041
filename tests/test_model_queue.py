"""The model queue (issue 14, item 4): forwards off the gRPC threads, in fair turns, bounded, cancellable."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessOwner, sentiment_examples
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from offsite.common.pema.representation import LocalRepresenter
from offsite.common.rpc import pb
from offsite.owner.limits import MODEL_RETRY_MIN_SECONDS
from offsite.owner.metrics import OwnerMetrics
from offsite.owner.model_queue import CallEnded, Job, ModelQueue, ModelQueueFull
from offsite.owner.representations import RepresentationBatcher
from offsite.owner.servicer import RETRY_AFTER_METADATA_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import load  # noqa: E402

WAIT_SECONDS = 30.0  # for what must happen soon; a test fails rather than hangs
HEALTH_SECONDS = 1.0  # the bound for small calls under load (as in test_abuse.py)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Gate:
    """Holds the queue's only worker in one step until opened: whatever is submitted meanwhile waits in line."""

    def __init__(self, queue: ModelQueue, spin: bool = False):
        self.opened, self.entered = threading.Event(), threading.Event()
        self.spin = spin  # spin in Python, holding the GIL as a forward's Python side does, instead of sleeping
        self.thread = threading.Thread(target=queue.admit("gate").call, args=(self._hold,), daemon=True)
        self.thread.start()
        assert self.entered.wait(WAIT_SECONDS)

    def _hold(self) -> None:
        self.entered.set()
        while not self.opened.wait(0 if self.spin else WAIT_SECONDS):
            sum(range(1000))

    def open(self) -> None:
        self.opened.set()
        self.thread.join(WAIT_SECONDS)


def call_in_thread(job: Job, work: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=job.call, args=(work,), daemon=True)
    thread.start()
    return thread


# Fairness


def test_a_tenants_burst_cannot_starve_another_tenant() -> None:
    queue = ModelQueue(workers=1, per_tenant=10, total=20)
    ran: list[str] = []
    gate = Gate(queue)
    flood = [call_in_thread(queue.admit("alice"), lambda: ran.append("alice")) for _ in range(8)]
    until(lambda: queue.depths()["alice"] == 8, "alice's burst to queue")
    other = call_in_thread(queue.admit("bob"), lambda: ran.append("bob"))
    until(lambda: queue.depths().get("bob") == 1, "bob's call to queue")
    gate.open()
    for thread in [*flood, other]:
        thread.join(WAIT_SECONDS)
    assert ran[:2] == ["alice", "bob"], f"bob waited behind alice's burst: {ran}"
    assert ran.count("alice") == 8


def test_a_long_job_gives_the_worker_up_after_each_step() -> None:
    queue = ModelQueue(workers=1)
    ran: list[str] = []
    bob_queued = threading.Event()

    def long_evaluation() -> Iterator[int]:
        for batch in range(20):
            ran.append(f"alice-{batch}")
            if batch == 2:
                bob_queued.wait(WAIT_SECONDS)
            yield batch

    reader = threading.Thread(target=lambda: list(queue.admit("alice").stream(long_evaluation())), daemon=True)
    reader.start()
    until(lambda: "alice-2" in ran, "alice's third batch")
    other = call_in_thread(queue.admit("bob"), lambda: ran.append("bob"))
    until(lambda: queue.depths().get("bob") == 1, "bob's call to queue")
    bob_queued.set()
    other.join(WAIT_SECONDS)
    reader.join(WAIT_SECONDS)
    assert ran.index("bob") <= ran.index("alice-3") + 1, f"bob waited for more than alice's next batch: {ran}"
    assert ran[-1] == "alice-19"


# Backpressure


def test_a_full_queue_refuses_at_once_with_a_retry_hint() -> None:
    queue = ModelQueue(workers=1, per_tenant=2, total=3)
    alice = [queue.admit("alice"), queue.admit("alice")]
    started = time.monotonic()
    with pytest.raises(ModelQueueFull, match="model_queue_per_tenant") as per_tenant:
        queue.admit("alice")
    bob = queue.admit("bob")
    with pytest.raises(ModelQueueFull, match="model_queue_total") as total:
        queue.admit("carol")
    assert time.monotonic() - started < 1.0, "a full queue must refuse, not wait"
    assert per_tenant.value.retry_after >= MODEL_RETRY_MIN_SECONDS and total.value.retry_after >= 1.0
    assert "retry in" in str(per_tenant.value)
    assert queue.depths() == {"alice": 2, "bob": 1}
    alice[0].cancel()  # a finished (or cancelled) call frees its slot
    queue.admit("carol").cancel()
    bob.cancel()
    alice[1].cancel()
    assert set(queue.depths().values()) == {0}


def test_a_full_model_queue_reaches_the_wire_as_resource_exhausted_with_retry_after(owner: InProcessOwner) -> None:
    owner.service.model_queue = queue = ModelQueue(workers=1, per_tenant=1)
    gate = Gate(queue)
    try:
        with owner.remote() as remote:
            request = pb.GenerateRequest(prompt="hi", max_new_tokens=2)
            queued = remote.stub.Generate(request, metadata=remote.metadata, timeout=WAIT_SECONDS)
            until(lambda: queue.depths().get("alice") == 1, "the first Generate to queue")
            refused = remote.stub.Generate(request, metadata=remote.metadata, timeout=WAIT_SECONDS)
            with pytest.raises(grpc.RpcError) as error:
                next(refused)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model_queue_per_tenant" in error.value.details()
            assert int(dict(error.value.trailing_metadata())[RETRY_AFTER_METADATA_KEY]) >= 1
            gate.open()
            assert list(queued)[-1].done
    finally:
        gate.open()


# Cancellation


def test_a_job_whose_call_ended_is_dropped_while_it_waits() -> None:
    queue = ModelQueue(workers=1)
    ran: list[str] = []

    def steps() -> Iterator[None]:
        ran.append("step")
        yield None

    gate = Gate(queue)
    ended = threading.Event()
    job = queue.admit("alice", ended)
    reader = threading.Thread(target=lambda: list(job.stream(steps())), daemon=True)
    reader.start()
    until(lambda: queue.depths()["alice"] == 1, "the job to queue")
    ended.set()  # the call was cancelled: its reader gives the job up within a poll
    until(lambda: queue.depths()["alice"] == 0, "the dropped job to free its slot")
    gate.open()
    reader.join(WAIT_SECONDS)
    assert ran == [], "a job whose call ended ran anyway"


def test_cancel_stops_a_running_job_after_its_step_and_returns_when_it_has() -> None:
    queue = ModelQueue(workers=1)
    in_step, release = threading.Event(), threading.Event()
    ran: list[int] = []
    closed = threading.Event()

    def batches() -> Iterator[int]:
        try:
            for batch in range(100):
                ran.append(batch)
                if batch == 1:
                    in_step.set()
                    release.wait(WAIT_SECONDS)
                yield batch
        finally:
            closed.set()

    job = queue.admit("alice")
    results = job.stream(batches())
    assert next(results) == 0
    until(in_step.is_set, "the second batch to run")
    threading.Timer(0.2, release.set).start()
    job.cancel()  # waits for the running batch: nothing of the job runs once it returns
    assert release.is_set() and closed.is_set()
    assert ran == [0, 1]
    assert queue.depths()["alice"] == 0


def test_a_call_that_ends_before_its_turn_raises_call_ended() -> None:
    queue = ModelQueue(workers=1)
    gate = Gate(queue)
    ended = threading.Event()
    threading.Timer(0.1, ended.set).start()
    try:
        with pytest.raises(CallEnded):
            queue.admit("alice", ended).call(lambda: "never")
    finally:
        gate.open()


def test_a_steps_error_reaches_its_reader_and_frees_the_slot() -> None:
    queue = ModelQueue(workers=1)

    def broken() -> None:
        raise ValueError("the forward failed")

    with pytest.raises(ValueError, match="the forward failed"):
        queue.admit("alice").call(broken)
    assert queue.depths() == {"alice": 0}
    assert queue.admit("alice").call(lambda: 7) == 7


# The Represent batcher runs inside the queue


def test_waiting_represent_requests_fold_into_one_forward_and_each_gets_its_own_rows(owner: InProcessOwner) -> None:
    model = owner.service.loaded.model
    batcher = RepresentationBatcher(model, batch=16)
    sequences = [[3 + i] * (2 + i) for i in range(8)]
    with ExitStack() as stack:
        requests = [stack.enter_context(batcher.pending(ids)) for ids in sequences]
        results = [batcher.run(request) for request in requests]  # the first takes the other seven along
    assert batcher.batches_run == 1, "eight waiting requests were not folded together"
    alone = LocalRepresenter(model)
    for ids, result in zip(sequences, results, strict=True):
        torch.testing.assert_close(result.hidden, alone.represent([ids])[0], atol=1e-5, rtol=0)


def test_a_withdrawn_represent_request_is_not_computed(owner: InProcessOwner) -> None:
    batcher = RepresentationBatcher(owner.service.loaded.model)
    with batcher.pending([5, 6]):
        pass  # its call ended before its turn
    with batcher.pending([7, 8]) as request:
        batcher.run(request)
    assert batcher.batches_run == 1 and request.future.result().hidden.shape[0] == 2


# The control plane stays responsive


def test_health_and_small_calls_answer_quickly_while_model_calls_are_queued(owner: InProcessOwner) -> None:
    owner.service.model_queue = queue = ModelQueue(workers=1)
    gate = Gate(queue, spin=True)  # the worker busy in Python, as it is between a forward's ops
    examples = [pb.Example(prompt=e.prompt, completion=e.completion) for e in sentiment_examples(4)]
    outcomes: list[str] = []

    def model_call(call: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                call()
                outcomes.append("ok")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    try:
        with owner.remote() as remote, grpc.insecure_channel(owner.address) as channel:
            cancelled = remote.stub.Generate(
                pb.GenerateRequest(prompt="hi", max_new_tokens=2), metadata=remote.metadata, timeout=WAIT_SECONDS
            )
            calls = [
                model_call(lambda: list(remote.generate(pb.GenerateRequest(prompt="hello", max_new_tokens=3)))),
                model_call(lambda: list(remote.evaluate(pb.EvaluateRequest(examples=examples, batch_size=2)))),
                model_call(lambda: list(remote.represent(iter([pb.RepresentRequest(token_ids=[1, 2, 3])])))),
            ]
            until(lambda: queue.depths().get("alice") == 4, "four model calls to queue")
            health = health_pb2_grpc.HealthStub(channel)
            seconds = []
            for _ in range(20):
                started = time.monotonic()
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_SECONDS)
                seconds.append(time.monotonic() - started)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            assert remote.model_card().emulators and list(remote.list_adapters().adapters) == []
            seconds.append(time.monotonic() - started)
            assert max(seconds) < HEALTH_SECONDS, f"small calls waited behind the model: {max(seconds):.3f} s"
            assert queue.depths()["alice"] == 4, "a model call ran while the worker was busy"
            cancelled.cancel()
            until(lambda: queue.depths()["alice"] == 3, "the cancelled call to leave the queue")
            gate.open()
            for thread in calls:
                thread.join(WAIT_SECONDS)
        assert outcomes == ["ok"] * 3
        until(lambda: queue.depths()["alice"] == 0, "every model call to finish")
    finally:
        gate.open()


def test_queue_depth_is_a_gauge_per_tenant() -> None:
    queue = ModelQueue(workers=1)
    metrics = OwnerMetrics(registry=CollectorRegistry(), model_queue=queue)
    jobs = [queue.admit("alice"), queue.admit("alice"), queue.admit("bob")]
    depth = metrics.registry.get_sample_value
    assert depth("offsite_model_queue_depth", {"tenant": "alice"}) == 2
    assert depth("offsite_model_queue_depth", {"tenant": "bob"}) == 1
    for job in jobs:
        job.cancel()
    assert depth("offsite_model_queue_depth", {"tenant": "alice"}) == 0


def test_the_load_benchmark_smoke_run_reports_both_kinds_of_call_and_a_complete_audit() -> None:
    result = load.main(["--smoke"])
    assert result["errors"] == 0 and result["loops"] > 0
    assert result["small_rpc_p99_ms"] > 0 and result["model_rpc_p99_ms"] > 0
    # the probe ran in its own process, and the daemon timed the same calls in the audit log
    assert result["probe_rpc_calls"] > 0 and result["probe_rpc_p99_ms"] > 0 and result["daemon_small_rpc_p99_ms"] > 0
    assert {"Health (probe)", "GetModelCard (probe)"} <= set(result["rpcs"])
    assert {"Generate", "Evaluate", "Represent"} <= set(result["rpcs"])
    assert result["audit_one_line_per_mutating_request"], result["audit_mutating"]
    # the daemon's memory was sampled while the clients ran, and its bound is stated (met or not: the bench's verdict)
    assert 0 < result["daemon_rss_at_ready_mib"] <= result["daemon_rss_peak_mib"]
    assert result["daemon_rss_bound_mib"] > result["daemon_rss_at_ready_mib"]
    assert isinstance(result["daemon_rss_within_bound"], bool)
