"""A probe in a process of its own: small calls every PROBE_SECONDS, as a load balancer or a newly arrived user sends.

bench/load.py starts it beside its clients. Its latencies are free of the load generator's own GIL and CPU use (16
client threads verifying hashes and decoding chunks in one process), so they say what the daemon answers under load.
Rotates Health → GetModelCard → ListAdapters; writes {"latencies": {rpc: [seconds...]}, "errors": [...]} as JSON.

    python bench/prober.py --address 127.0.0.1:50051 --token T --seconds 60 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import cycle
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offsite.client.connection import Remote, RemoteError

PROBE_SECONDS = 0.1
HEALTH = "Health"
PROBE_DEADLINE_SECONDS = 30.0


def probe(address: str, token: str, seconds: float) -> dict[str, Any]:
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    until = time.monotonic() + seconds
    with Remote(address, token) as remote, grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        calls: dict[str, Callable[[], Any]] = {
            HEALTH: lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_DEADLINE_SECONDS),
            "GetModelCard": remote.model_card,
            "ListAdapters": remote.list_adapters,
        }
        for call in calls.values():  # untimed: the channels connect, as a long-running prober's already have
            call()
        for name in cycle(calls):
            if time.monotonic() >= until:
                break
            started = time.perf_counter()
            try:
                calls[name]()
                latencies[name].append(time.perf_counter() - started)
            except (grpc.RpcError, RemoteError) as error:
                errors.append(f"{name}: {error}")
            time.sleep(PROBE_SECONDS)
    return {"latencies": dict(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(probe(args.address, args.token, args.seconds)))


if __name__ == "__main__":
    main()
