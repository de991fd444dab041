"""Load: N concurrent data owners on loopback pull, push, evaluate, list and delete against one daemon for a while.

Each client is its own tenant and loops: GetModelCard → PullArtifact (the whole emulator; signature and every hash
verified) → PushAdapter → Evaluate (a few SST-2 dev rows on the pushed adapter) → Represent (64 tokens, top-10
log-probs) → ListAdapters → DeleteAdapter.
Counts errors and corrupted pulls, and reports p50/p99 latency per RPC. The daemon runs as a subprocess, as deployed.

    python bench/load.py --clients 16 --seconds 60

writes bench/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from offsite.client.connection import Remote, RemoteError
from offsite.client.demo import start_owner
from offsite.client.evaluation import evaluate_remote
from offsite.client.pull import pull_emulator
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.examples import read_jsonl
from offsite.common.manifest import BundleError
from offsite.common.rpc import pb
from offsite.owner.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "client" / "data"
RESULTS = ROOT / "bench" / "results" / "load"
WHOLE_PULL = "PullArtifact (every file of the emulator)"
REPRESENT_REQUEST = pb.RepresentRequest(token_ids=list(range(100, 164)), log_probs="top_k", top_k=10)


class Stats:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.corrupted = 0
        self.loops = 0
        self._lock = threading.Lock()

    def timed(self, name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = call(*args, **kwargs)
        with self._lock:
            self.latencies[name].append(time.perf_counter() - started)
        return result

    def loop_done(self) -> None:
        with self._lock:
            self.loops += 1

    def error(self, text: str, corrupted: bool = False) -> None:
        with self._lock:
            self.errors.append(text)
            self.corrupted += int(corrupted)


def client_loop(address: str, token: str, adapter: Path, examples: list, until: float, scratch: Path, stats: Stats):
    target = scratch / "emulator"
    with Remote(address, token) as remote:
        while time.monotonic() < until:
            try:
                stats.timed("GetModelCard", remote.model_card)
                stats.timed(WHOLE_PULL, pull_emulator, remote, target, show_progress=False)
                pushed = stats.timed("PushAdapter", push_adapter, remote, adapter, show_progress=False)
                stats.timed("Evaluate", evaluate_remote, remote, examples, pushed.adapter_id, show_progress=False)
                stats.timed("Represent", lambda request: list(remote.represent(iter([request]))), REPRESENT_REQUEST)
                stats.timed("ListAdapters", remote.list_adapters)
                stats.timed("DeleteAdapter", remote.delete_adapter, pushed.adapter_id)
                stats.loop_done()
            except BundleError as error:
                stats.error(f"corrupted pull: {error}", corrupted=True)
            except (RemoteError, ValueError, OSError) as error:
                stats.error(f"{type(error).__name__}: {error}")
            finally:
                shutil.rmtree(target, ignore_errors=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offsite-load-"))
    store_dir = work / "owner-store"
    store = Store(store_dir)
    tokens = [store.add_tenant(f"load{i}-{os.getpid()}-{int(time.time())}") for i in range(args.clients)]
    store.close()
    audit = store_dir / "audit.jsonl"
    audit_before = audit.read_text().count("\n") if audit.exists() else 0  # a reused store has older lines
    env = dict(os.environ, OFFSITE_HOME=str(work / "client-config"))
    owner, address = start_owner(args.model, store_dir, args.emulator, work / "owner.log", env)
    try:
        with Remote(address, tokens[0]) as remote:
            pulled = pull_emulator(remote, work / "emulator", show_progress=False)
        train = read_jsonl(SAMPLE_DATA / "sst2_train.jsonl", limit=16)
        examples = read_jsonl(SAMPLE_DATA / "sst2_dev.jsonl", limit=args.eval_examples)
        adapter = work / "adapter"
        train_adapter(work / "emulator", train, TrainConfig(epochs=1), adapter, show_progress=False)

        stats = Stats()
        until = time.monotonic() + args.seconds
        started = time.perf_counter()
        threads = []
        for index, token in enumerate(tokens):
            scratch = work / f"client-{index}"
            scratch.mkdir(exist_ok=True)
            thread = threading.Thread(
                target=client_loop, args=(address, token, adapter, examples, until, scratch, stats), daemon=True
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        owner.terminate()
        owner.wait(60)
    audit_lines = (audit.read_text().count("\n") if audit.exists() else 0) - audit_before
    rows = {
        name: {
            "calls": len(values),
            "p50_ms": round(statistics.median(values) * 1000, 1),
            "p99_ms": round(percentile(values, 0.99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }
        for name, values in sorted(stats.latencies.items())
    }
    return {
        "model": args.model,
        "emulator": pulled["emulator"],
        "emulator_bytes": pulled["bytes"],
        "clients": args.clients,
        "seconds": round(wall, 1),
        "loops": stats.loops,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "corrupted_artifacts": stats.corrupted,
        "audit_lines": audit_lines,
        "eval_examples_per_call": len(examples),
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "rpcs": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Load: {result['clients']} concurrent clients for {result['seconds']} s",
        "",
        f"Daemon on `{result['model']}`, emulator `{result['emulator']}` ({result['emulator_bytes'] / 2**20:.1f} MiB "
        f"per pull, every hash and the signature verified), Evaluate on {result['eval_examples_per_call']} SST-2 dev "
        f"rows. {result['device']}.",
        "",
        f"**{result['loops']} full loops, {result['errors']} errors, {result['corrupted_artifacts']} corrupted "
        f"artifacts**; the audit log gained {result['audit_lines']} lines, one per RPC.",
        "",
        "| RPC | calls | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rpcs"].items():
        lines.append(f"| {name} | {row['calls']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--emulator", default="uniform:2-8-2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--eval-examples", type=int, default=4)
    parser.add_argument("--workdir", help="keep the store and logs here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS), help="results path without extension")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    write_results(out, result, markdown(result))


if __name__ == "__main__":
    main()
