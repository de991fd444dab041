"""`offsite demo`: the whole offsite-tuning workflow on loopback, through the real daemon and CLI.

Each step is the real command in its own process, so each row's peak memory is that process's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..common import confidence
from ..common.contract import DEFAULT_MODEL
from ..owner.store import Store
from .config import CONFIG_ENVIRONMENT, CONFIG_NAME

MiB = 1024 * 1024
READY_TIMEOUT_SECONDS = 1800  # a distilled emulator is built before the daemon is ready


def sample_path(name: str) -> Path:
    return Path(str(resources.files("offsite.client") / "data" / name))


def run_json(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Runs one CLI command with --json; its progress goes to our stderr, its last stdout line is the result."""
    completed = subprocess.run([*command, "--json"], env=env, stdout=subprocess.PIPE, text=True)
    lines = completed.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if completed.returncode != 0 or not result.get("ok"):
        raise RuntimeError(f"{' '.join(command[2:4])} failed: {result.get('error', completed.returncode)}")
    return result


def start_daemon(serve_args: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, Any]]:
    """`offsite-owner serve SERVE_ARGS --json` in its own process, its log in `log`; returns it and its ready line."""
    command = [sys.executable, "-m", "offsite.owner", "serve", *serve_args, "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("{"):
            return process, json.loads(line)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"the owner daemon did not start; see {log}:\n{log.read_text()[-2000:]}")


def start_owner(model: str, store: Path, emulator: str, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    serve_args = ["--model", model, "--store", str(store), "--listen", "127.0.0.1:0", "--emulator", emulator]
    process, ready = start_daemon(serve_args, log, env)
    return process, ready["address"]


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, pattern)


def render_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | accuracy | loss | eval s | train wall s | train peak RSS MiB | eval peak RSS MiB |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['row']} | {_fmt(row['accuracy'], '.4f')} | {_fmt(row['loss'], '.4f')} | "
            f"{_fmt(row['eval_seconds'], '.1f')} | {_fmt(row.get('train_seconds'), '.1f')} | "
            f"{_fmt(row.get('train_peak_rss_mib'), '.0f')} | {_fmt(row['eval_peak_rss_mib'], '.0f')} |"
        )
    return "\n".join(lines)


def _row(name: str, report: dict[str, Any], training: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "row": name,
        "accuracy": report["accuracy"],
        "loss": report["loss"],
        "examples": report["examples"],
        "eval_seconds": report["seconds"],
        "eval_peak_rss_mib": report["peak_rss_bytes"] / MiB,
        "eval_where": report["where"],
        "train_seconds": training["seconds"] if training else None,
        "train_peak_rss_mib": training["peak_rss_bytes"] / MiB if training else None,
    }


def gain_interval(plugged: list[bool], zero_shot: list[bool]) -> confidence.Comparison:
    """plug-in − zero-shot with its 95% paired-bootstrap CI and p-value: both rows scored the same examples."""
    return confidence.compare(np.array([plugged], dtype=float), np.array([zero_shot], dtype=float))


def run_demo(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_data = args.train_data or str(sample_path("sst2_train.jsonl"))
    eval_data = args.eval_data or str(sample_path("sst2_dev.jsonl"))
    store = workdir / "owner-store"
    token = Store(store).add_tenant(f"demo-{int(time.time())}")
    # The demo's client config (its trust-on-first-use record of the owner key) stays in the work directory.
    env = dict(os.environ, OFFSITE_TOKEN=token, **{CONFIG_ENVIRONMENT: str(workdir / "client-config" / CONFIG_NAME)})
    offsite = [sys.executable, "-m", "offsite.client"]
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print

    say(f"[demo] work directory: {workdir}")
    say(f"[demo] starting the owner daemon on {args.model or DEFAULT_MODEL} (first start converts the GGUF) ...")
    if not args.emulator.startswith("uniform:"):
        say(f"[demo] building {args.emulator} takes minutes on CPU; its progress is in {workdir / 'owner.log'}")
    owner, address = start_owner(args.model, store, args.emulator, workdir / "owner.log", env)
    try:
        emulator_dir, adapter_dir = workdir / "emulator", workdir / "adapter"
        say(f"[demo] owner ready on {address}; pulling the signed emulator")
        pulled = run_json([*offsite, "pull", "--server", address, "--out", str(emulator_dir)], env)
        key = ["--owner-key", pulled["owner_public_key"]]
        limits = ["--limit", str(args.eval_limit)]

        say("[demo] emulator zero-shot, locally")
        emulator_zero = run_json(
            [*offsite, "eval", "--emulator", str(emulator_dir), "--data", eval_data, *limits, *key], env
        )
        say(f"[demo] training a {args.method} adapter locally on {args.train_limit} examples (no data leaves)")
        train = [
            *offsite,
            "train",
            "--emulator",
            str(emulator_dir),
            "--data",
            train_data,
            "--method",
            args.method,
            "--out",
            str(adapter_dir),
            "--limit",
            str(args.train_limit),
            *key,
        ]
        for flag, value in (("--epochs", args.epochs), ("--lr", args.lr), ("--train-blocks", args.train_blocks)):
            train += [flag, str(value)] if value is not None else []
        training = run_json(train, env)
        say("[demo] emulator + adapter, locally")
        emulator_adapter = run_json(
            [
                *offsite,
                "eval",
                "--emulator",
                str(emulator_dir),
                "--adapter",
                str(adapter_dir),
                "--data",
                eval_data,
                *limits,
                *key,
            ],
            env,
        )
        say("[demo] pushing only the adapter weights")
        pushed = run_json([*offsite, "push", "--server", address, "--adapter", str(adapter_dir)], env)
        say("[demo] the owner evaluates its full model, zero-shot and with the adapter plugged in")
        # --yes: the demo's evaluation rows are public SST-2 dev sentences, sent to our own loopback owner
        remote_eval = [*offsite, "eval", "--server", address, "--data", eval_data, *limits, "--yes"]
        full_zero = run_json(remote_eval, env)
        plugged = run_json([*remote_eval, "--adapter-id", pushed["adapter_id"]], env)
        sample = run_json(
            [
                *offsite,
                "generate",
                "--server",
                address,
                "--adapter-id",
                pushed["adapter_id"],
                "--prompt",
                "Review: a moving, beautifully acted film\nSentiment:",
                "--max-new-tokens",
                "3",
            ],
            env,
        )
    finally:
        owner.terminate()
        owner.wait(timeout=60)

    rows = [
        _row("full model, zero-shot (owner)", full_zero, None),
        _row(f"emulator {args.emulator}, zero-shot (local)", emulator_zero, None),
        _row(f"emulator + {args.method} adapter (local)", emulator_adapter, training),
        _row(f"plug-in: full model + {args.method} adapter (owner)", plugged, training),
    ]
    table = render_table(rows)
    comparison = gain_interval(plugged["correct"], full_zero["correct"])
    gain, low, high = (comparison.difference.mean, comparison.difference.ci_low, comparison.difference.ci_high)
    verdict = "above the noise" if low > 0 else "below zero-shot beyond the noise" if high < 0 else "inside the noise"
    summary = (
        f"plug-in − zero-shot: {gain * 100:+.2f} points, 95% CI [{low * 100:+.2f}, {high * 100:+.2f}], "
        f"p = {comparison.p_value:.3f} (paired bootstrap on the same {len(full_zero['correct'])} rows): {verdict}"
    )
    results = {
        "ok": True,
        "model": args.model,
        "emulator": args.emulator,
        "method": args.method,
        "train_examples": training["examples"],
        "eval_examples": rows[0]["examples"],
        "adapter_id": pushed["adapter_id"],
        "adapter_bytes": pushed["bytes"],
        "rows": rows,
        "plug_in_gain": {
            "points": gain * 100,
            "ci_low": low * 100,
            "ci_high": high * 100,
            "p_value": comparison.p_value,
            "paired": True,
            "verdict": verdict,
        },
        "generated": sample["text"],
        "total_seconds": time.perf_counter() - started,
        "workdir": str(workdir),
    }
    (workdir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (workdir / "demo_results.md").write_text(table + "\n\n" + summary + "\n")
    if args.json:
        print(json.dumps(results, sort_keys=True), flush=True)
        return
    print()
    print(table)
    print()
    print(summary)
    print(f"adapter {pushed['adapter_id'][:16]}… ({pushed['bytes'] / MiB:.2f} MiB) generated: {sample['text']!r}")
    print(f"demo finished in {results['total_seconds']:.0f} s; results in {workdir}/demo_results.md")
