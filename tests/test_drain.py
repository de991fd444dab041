"""The shutdown drain, in process: refusals are UNAVAILABLE, calls in flight finish, health stays answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
from conftest import InProcessOwner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offsite.client.connection import RemoteError
from offsite.common.rpc import pb
from offsite.owner.drain import Drain
from offsite.owner.server import shutdown


def test_a_drain_refuses_new_calls_and_waits_for_the_one_in_flight(owner: InProcessOwner) -> None:
    release = threading.Event()

    def requests() -> Iterator[pb.RepresentRequest]:
        yield pb.RepresentRequest(token_ids=[5, 6, 7])
        release.wait(30)
        yield pb.RepresentRequest(token_ids=[8])

    with owner.remote() as remote, grpc.insecure_channel(owner.address) as channel:
        call = remote.stub.Represent(requests(), metadata=remote.metadata, timeout=30)
        next(call)
        stopping = threading.Thread(target=shutdown, args=(owner.server, 0.0, 30.0))
        stopping.start()
        deadline = time.monotonic() + 10
        refusal = None
        while refusal is None and time.monotonic() < deadline:
            try:
                remote.model_card()
                time.sleep(0.05)
            except RemoteError as error:
                refusal = error
        assert refusal is not None and refusal.code == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # exempt from the drain: still answered
        assert stopping.is_alive(), "the server stopped with a call in flight"
        release.set()
        assert len(list(call)) == 1
        stopping.join(30)
        assert not stopping.is_alive()


def test_wait_idle_gives_up_after_its_timeout() -> None:
    drain = Drain()
    assert drain._enter()
    drain.begin()
    assert not drain._enter()  # refused once draining
    started = time.monotonic()
    assert drain.wait_idle(0.2) is False and drain.in_flight == 1
    assert time.monotonic() - started >= 0.2
    drain._leave()
    assert drain.wait_idle(0.2) is True
