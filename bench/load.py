"""Load: N concurrent data owners on loopback pull, push, evaluate, list and delete against one daemon for a while.

Each client is its own tenant and loops: GetModelCard → PullArtifact (the whole emulator; signature and every hash
verified) → PushAdapter → Evaluate (a few SST-2 dev rows on the pushed adapter) → Represent (64 tokens, top-10
log-probs) → Generate (8 tokens) → ListAdapters → DeleteAdapter. Meanwhile a probe in a process of its own
(bench/prober.py) sends a small call every 0.1 s (health, model card, listing), as a load balancer would.
Counts errors and corrupted pulls, and reports p50/p99 latency per RPC and for the two kinds the model queue keeps
apart: small calls (health, model card, push, list, delete) and model calls (Evaluate, Represent, Generate). Small
calls are reported three ways: as the clients and the probe saw them; as the probe alone saw them (free of the load
generator's own GIL); and as the daemon timed them (the audit log's `duration_ms`: handler time, before the audit
line is written). Checks that the audit log holds exactly one line per mutating request (push, delete). The daemon
runs as a subprocess, as deployed.

    python bench/load.py --clients 16 --seconds 60    # writes bench/results/load.{json,md}
    python bench/load.py --smoke                       # a tiny random model, 2 clients, seconds; writes to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import torch

from offsite.client.connection import Remote, RemoteError
from offsite.client.demo import start_owner
from offsite.client.evaluation import evaluate_remote
from offsite.client.pull import pull_emulator
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.contract import DEFAULT_MODEL, MAX_MESSAGE_BYTES
from offsite.common.examples import read_jsonl
from offsite.common.manifest import BundleError
from offsite.common.rpc import pb
from offsite.owner.limits import GIL_SWITCH_MS, MAX_STREAMS_TOTAL
from offsite.owner.service import PLUGGED_CACHE_SIZE
from offsite.owner.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prober import HEALTH  # noqa: E402
from results_files import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "client" / "data"
RESULTS = ROOT / "bench" / "results" / "load"
WHOLE_PULL = "PullArtifact (every file of the emulator)"
REPRESENT_REQUEST = pb.RepresentRequest(token_ids=list(range(100, 164)), log_probs="top_k", top_k=10)
GENERATE_REQUEST = pb.GenerateRequest(prompt="The film was", max_new_tokens=8)
SMALL_RPCS = (HEALTH, "GetModelCard", "PushAdapter", "ListAdapters", "DeleteAdapter")
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
PROBE_SUFFIX = " (probe)"  # the probe's rows, beside the clients' rows of the same RPC
MODEL_RPCS = ("Evaluate", "Represent", "Generate")
MUTATING_RPCS = ("PushAdapter", "DeleteAdapter")  # what changes the store: each must leave one audit line
RSS_SAMPLE_SECONDS = 0.2
PROBE_GRACE_SECONDS = 120.0  # past the run's end: the probe's last call may wait on a deadline
# Models the daemon may hold at once: the loaded one, the plugged cache, one being plugged, one evicted while in use.
MODEL_COPIES_BOUND = 1 + PLUGGED_CACHE_SIZE + 2
STREAM_BUFFERS_BOUND = MAX_STREAMS_TOTAL * 2 * MAX_MESSAGE_BYTES  # a message in and one out per stream


class RssSampler:
    """The daemon's resident memory, sampled on a thread: at ready (the first sample) and its peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.at_ready = self._process.memory_info().rss
        self.peak = self.at_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.Error:  # the daemon has exited
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def bound(self) -> int:
        """What the daemon should stay under: its start-up footprint once per model copy, plus the stream buffers."""
        return MODEL_COPIES_BOUND * self.at_ready + STREAM_BUFFERS_BOUND


class Stats:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.attempts: Counter[str] = Counter()  # calls started, answered or not: what the audit log must show
        self.errors: list[str] = []
        self.corrupted = 0
        self.loops = 0
        self._lock = threading.Lock()

    def timed(self, name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.attempts[name] += 1
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
                stats.timed("Generate", lambda request: list(remote.generate(request)), GENERATE_REQUEST)
                stats.timed("ListAdapters", remote.list_adapters)
                stats.timed("DeleteAdapter", remote.delete_adapter, pushed.adapter_id)
                stats.loop_done()
            except BundleError as error:
                stats.error(f"corrupted pull: {error}", corrupted=True)
            except (RemoteError, ValueError, OSError) as error:
                stats.error(f"{type(error).__name__}: {error}")
            finally:
                shutil.rmtree(target, ignore_errors=True)


def start_probe(address: str, token: str, seconds: float, out: Path) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).with_name("prober.py")), "--address", address, "--token", token]
    return subprocess.Popen([*command, "--seconds", str(seconds), "--out", str(out)])


def add_probe(stats: Stats, probe: subprocess.Popen, out: Path) -> None:
    """The probe's latencies and errors, under its own row names, once it has finished."""
    if probe.wait(PROBE_GRACE_SECONDS) != 0:
        stats.error(f"the probe exited with {probe.returncode}")
        return
    found = json.loads(out.read_text())
    for name, values in found["latencies"].items():
        stats.latencies[name + PROBE_SUFFIX].extend(values)
    for text in found["errors"]:
        stats.error(f"probe: {text}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def latency_row(values: list[float]) -> dict[str, Any]:
    return {
        "calls": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def audit_lines(audit: Path, skip: int) -> list[dict[str, Any]]:
    """The audit log's lines past the first `skip` (a reused store's older lines), with the RPC's name as here."""
    lines = audit.read_text().splitlines()[skip:] if audit.exists() else []
    found = [{**line, "rpc": line["method"].rsplit("/", 1)[-1]} for line in map(json.loads, lines)]
    return [{**line, "rpc": HEALTH} if line["method"] == HEALTH_METHOD else line for line in found]


# What each run at one switch interval contributes to the side-by-side table
SIDE_BY_SIDE = (
    "gil_switch_ms",
    "loops",
    "errors",
    "small_rpc_p50_ms",
    "small_rpc_p99_ms",
    "probe_rpc_p99_ms",
    "daemon_small_rpc_p99_ms",
    "model_rpc_p50_ms",
    "model_rpc_p99_ms",
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offsite-load-"))
    store_dir = work / "owner-store"
    store = Store(store_dir)
    tokens = [store.add_tenant(f"load{i}-{os.getpid()}-{int(time.time())}") for i in range(args.clients)]
    probe_token = store.add_tenant(f"probe-{os.getpid()}-{int(time.time())}")
    store.close()
    audit = store_dir / "audit.jsonl"
    audit_before = audit.read_text().count("\n") if audit.exists() else 0  # a reused store has older lines
    env = dict(os.environ, OFFSITE_HOME=str(work / "client-config"), OFFSITE_GIL_SWITCH_MS=str(args.gil_switch_ms))
    owner, address = start_owner(args.model, store_dir, args.emulator, work / "owner.log", env)
    rss = RssSampler(owner.pid)
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
        probe_out = work / "probe.json"
        probe = start_probe(address, probe_token, args.seconds, probe_out)
        for thread in threads:
            thread.join()
        add_probe(stats, probe, probe_out)
        wall = time.perf_counter() - started
    finally:
        rss.stop()
        owner.terminate()
        owner.wait(60)
    lines = audit_lines(audit, audit_before)
    audited = Counter(line["rpc"] for line in lines)
    mutating = {name: {"requests": stats.attempts[name], "audit_lines": audited[name]} for name in MUTATING_RPCS}
    rows = {name: latency_row(values) for name, values in sorted(stats.latencies.items())}
    small = latency_row(
        [v for name in SMALL_RPCS for suffix in ("", PROBE_SUFFIX) for v in stats.latencies[name + suffix]]
    )
    probed = latency_row([v for name in SMALL_RPCS for v in stats.latencies[name + PROBE_SUFFIX]])
    in_daemon = latency_row([line["duration_ms"] / 1000 for line in lines if line["rpc"] in SMALL_RPCS])
    model = latency_row([v for name in MODEL_RPCS for v in stats.latencies[name]])
    return {
        "model": args.model,
        "emulator": pulled["emulator"],
        "emulator_bytes": pulled["bytes"],
        "clients": args.clients,
        "gil_switch_ms": args.gil_switch_ms,
        "seconds": round(wall, 1),
        "loops": stats.loops,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "corrupted_artifacts": stats.corrupted,
        "audit_lines": sum(audited.values()),
        "audit_mutating": mutating,
        "audit_one_line_per_mutating_request": all(m["requests"] == m["audit_lines"] for m in mutating.values()),
        "small_rpc_p50_ms": small["p50_ms"],
        "small_rpc_p99_ms": small["p99_ms"],
        "probe_rpc_p50_ms": probed["p50_ms"],
        "probe_rpc_p99_ms": probed["p99_ms"],
        "probe_rpc_calls": probed["calls"],
        "daemon_small_rpc_p50_ms": in_daemon["p50_ms"],
        "daemon_small_rpc_p99_ms": in_daemon["p99_ms"],
        "model_rpc_p50_ms": model["p50_ms"],
        "model_rpc_p99_ms": model["p99_ms"],
        "model_rpc_calls": model["calls"],
        "eval_examples_per_call": len(examples),
        "daemon_rss_at_ready_mib": round(rss.at_ready / 2**20, 1),
        "daemon_rss_peak_mib": round(rss.peak / 2**20, 1),
        "daemon_rss_bound_mib": round(rss.bound() / 2**20, 1),
        "daemon_rss_within_bound": rss.peak <= rss.bound(),
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
        f"artifacts**; the audit log gained {result['audit_lines']} lines, {audit_verdict(result)}.",
        "",
        f"Small calls ({', '.join(SMALL_RPCS)}): p50 {result['small_rpc_p50_ms']} ms, p99 "
        f"{result['small_rpc_p99_ms']} ms; from the probe's own process alone ({result['probe_rpc_calls']} calls) "
        f"p50 {result['probe_rpc_p50_ms']} ms, p99 {result['probe_rpc_p99_ms']} ms; inside the daemon (the audit "
        f"log's handler times) p50 {result['daemon_small_rpc_p50_ms']} ms, p99 {result['daemon_small_rpc_p99_ms']} "
        f"ms. Model calls ({', '.join(MODEL_RPCS)}): p50 {result['model_rpc_p50_ms']} "
        f"ms, p99 {result['model_rpc_p99_ms']} ms, {result['model_rpc_calls']} calls.",
        "",
        f"Daemon memory: RSS {result['daemon_rss_at_ready_mib']} MiB at ready, peak "
        f"{result['daemon_rss_peak_mib']} MiB; stated bound {result['daemon_rss_bound_mib']} MiB "
        f"({MODEL_COPIES_BOUND} × the RSS at ready, one per model copy it may hold, plus "
        f"{STREAM_BUFFERS_BOUND // 2**20} MiB of stream buffers): "
        f"{'within it' if result['daemon_rss_within_bound'] else 'OVER it'}.",
        "",
        "| RPC | calls | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rpcs"].items():
        lines.append(f"| {name} | {row['calls']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    return "\n".join(lines + side_by_side(result)) + "\n"


def side_by_side(result: dict[str, Any]) -> list[str]:
    """The runs at each GIL switch interval, in the order they ran (empty for one run)."""
    runs = result.get("switch_interval_runs", [])
    if len(runs) < 2:
        return []
    lines = [
        "",
        "## GIL switch interval, one run each, in this order",
        "",
        "| switch ms | loops | errors | small p50 / p99 ms | probe p99 ms | in-daemon p99 ms | model p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['gil_switch_ms']:g} | {r['loops']} | {r['errors']} | {r['small_rpc_p50_ms']} / "
            f"{r['small_rpc_p99_ms']} | {r['probe_rpc_p99_ms']} | {r['daemon_small_rpc_p99_ms']} | "
            f"{r['model_rpc_p50_ms']} / {r['model_rpc_p99_ms']} |"
        )
    return lines


def audit_verdict(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{m['audit_lines']}/{m['requests']} {name}" for name, m in result["audit_mutating"].items())
    verdict = "one per mutating request" if result["audit_one_line_per_mutating_request"] else "NOT one per request"
    return f"{verdict} ({counts})"


def smoke_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """A tiny random model, two clients, a few seconds: every code path, none of the cost."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="offsite-load-smoke-"))
    args.model = str(save_tiny_model("llama", work / "model"))
    args.emulator, args.clients, args.seconds, args.eval_examples = "uniform:1-2-1", 2, 3.0, 2
    args.workdir, args.out = str(work), str(work / "load")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--emulator", default="uniform:2-8-2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--eval-examples", type=int, default=4)
    parser.add_argument(
        "--gil-switch-ms",
        default=str(GIL_SWITCH_MS),
        help="the daemon's GIL switch interval; several (comma-separated) run one after another, the last reported "
        "in full and all side by side",
    )
    parser.add_argument("--workdir", help="keep the store and logs here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS), help="results path without extension")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 clients, 3 s, results in a temp dir")
    args = parser.parse_args(argv)
    if args.smoke:
        args = smoke_arguments(args)
    runs = []
    for interval in (float(value) for value in args.gil_switch_ms.split(",")):
        runs.append(run(argparse.Namespace(**{**vars(args), "gil_switch_ms": interval})))
    result = {**runs[-1], "switch_interval_runs": [{key: r[key] for key in SIDE_BY_SIDE} for r in runs]}
    write_results(Path(args.out), result, markdown(result))
    return result


if __name__ == "__main__":
    main()
