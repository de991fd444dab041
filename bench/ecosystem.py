"""The operator's acceptance path of issue 15, run for real on the default model, with its transcript committed.

    python bench/ecosystem.py            # about 25 minutes on 2 cores; writes bench/results/ecosystem.{json,md}
    python bench/ecosystem.py --report   # only the Markdown, from the committed JSON

Steps, each through the shipped commands (subprocesses, as an operator types them):
1. `offsite-owner config check FILE` and `config show` on a config file;
2. `offsite-owner serve --config FILE`: the banner, and the metrics endpoint scraped before and after a pull;
3. the service listed by gRPC reflection and its health checked (what `grpcurl list` and
   `grpcurl ... grpc.health.v1.Health/Check` do; grpcurl itself is not installable here);
4. `offsite pull`, `offsite train` (LoRA, the CLI's defaults) and `offsite push`;
5. `offsite-owner export`, loaded with plain transformers, its logits against the owner's plug-in;
6. lm-evaluation-harness (`lm_eval run --model hf`) on the base model and on the export: its own SST-2 prompt on the
   shared SST-2 dev rows (a local task file: everything offline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite.client.demo import start_daemon
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.model_loading import load_model
from offsite.owner.adapters.plugin import plug
from offsite.owner.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHARED_SST2_DEV = ROOT.parent / "shared" / "datasets" / "sst2" / "dev.tsv"
TRAIN_DATA = ROOT / "client" / "data" / "sst2_train.jsonl"
EMULATOR = "uniform:2-8-2"  # training-free: the path is what is shown here, not the transfer (bench/transfer.py)
TRAIN_LIMIT = 1000
TENANT = "ecosystem"
PROBE_PROMPT = "Review: a moving, beautifully acted film\nSentiment:"
# lm-eval's own glue/sst2 task (prompt, choices, metric) pointed at the shared rows instead of the hub
LM_EVAL_TASK = """task: sst2_shared
dataset_path: csv
dataset_kwargs:
  data_files:
    validation: {dev}
  delimiter: "\\t"
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{content}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(argv: list[str], env: dict[str, str], transcript: list[dict[str, Any]], timeout: int = 1800) -> str:
    """Runs one shell command as an operator would, keeps it and its output (stdout; the last lines of stderr)."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    shown = [Path(a).name if a == sys.executable else a for a in argv]
    transcript.append(
        {
            "command": " ".join(shown),
            "exit": done.returncode,
            "stdout": done.stdout.strip()[-4000:],
            "stderr_tail": "\n".join(done.stderr.strip().splitlines()[-3:]),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(shown)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def last_json(text: str) -> dict[str, Any]:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def scrape(url: str, names: tuple[str, ...]) -> list[str]:
    """The metric lines an operator would grep for."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line.startswith(names)]


def reflect(address: str) -> dict[str, Any]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = sorted(s.name for a in answers for s in a.list_services_response.service)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="offsite.v1.ModelOwner")
        )
    return {"services": services, "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}


def stop_daemon(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def plug_in_agreement(store: Path, adapter_id: str, export: Path) -> dict[str, Any]:
    """The export, loaded by plain transformers, against the owner's own plug-in of the same adapter."""
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    owner_store = Store(store)
    record = owner_store.get_adapter(TENANT, adapter_id)
    assert record is not None
    loaded = load_model(DEFAULT_MODEL, cache_dir=owner_store.models_dir)
    plugged = plug(loaded.model, owner_store.verified_adapter_dir(adapter_id), record.method).eval()
    ids = tokenizer(PROBE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (exported(ids).logits - plugged(ids).logits).abs().max().item()
    owner_store.close()
    return {"class": type(exported).__name__, "parameters": exported.num_parameters(), "max_abs_logit_diff": difference}


def lm_eval(model_dir: Path, tasks_dir: Path, out: Path, env: dict[str, str], transcript: list) -> dict[str, Any]:
    argv = [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", "hf"]
    argv += ["--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", "sst2_shared"]
    argv += ["--include_path", str(tasks_dir), "--batch_size", "16", "--output_path", str(out)]
    command(argv, env, transcript)
    result = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    scores = result["results"]["sst2_shared"]
    return {"acc": scores["acc,none"], "acc_stderr": scores["acc_stderr,none"], "n": result["n-samples"]["sst2_shared"]}


def run(work: Path) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store = work / "owner-store"
    token = Store(store).add_tenant(TENANT)
    env = dict(os.environ, OFFSITE_TOKEN=token, OFFSITE_CLIENT_CONFIG=str(work / "client.toml"))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    metrics_port = free_port()
    config = work / "owner.toml"
    config.write_text(
        f'model = "{DEFAULT_MODEL}"\nstore = "owner-store"\nlisten = "127.0.0.1:0"\nemulator = ["{EMULATOR}"]\n'
        f"metrics_port = {metrics_port}\n"
    )
    owner, client = [sys.executable, "-m", "offsite.owner"], [sys.executable, "-m", "offsite.client"]
    transcript: list[dict[str, Any]] = []
    command([*owner, "config", "check", str(config)], env, transcript)
    command([*owner, "config", "show", "--config", str(config)], env, transcript)

    daemon, ready = start_daemon(["--config", str(config)], work / "owner.log", env)
    try:
        address = ready["address"]
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        watched = ("grpc_server_handled_total", "offsite_rpc_sent_bytes_total", "offsite_adapters_stored")
        before = scrape(url, watched)
        grpc_view = reflect(address)
        emulator_dir, adapter_dir = work / "emulator", work / "adapter"
        pulled = last_json(
            command([*client, "pull", "--server", address, "--out", str(emulator_dir), "--json"], env, transcript)
        )
        key = ["--owner-key", pulled["owner_public_key"]]
        train = [
            *client,
            "train",
            "--emulator",
            str(emulator_dir),
            "--data",
            str(TRAIN_DATA),
            "--out",
            str(adapter_dir),
        ]
        trained = last_json(command([*train, "--limit", str(TRAIN_LIMIT), *key, "--json"], env, transcript))
        pushed = last_json(
            command([*client, "push", "--server", address, "--adapter", str(adapter_dir), "--json"], env, transcript)
        )
        after = scrape(url, watched)
    finally:
        exit_code = stop_daemon(daemon)
    banner = "\n".join(
        line
        for line in (work / "owner.log").read_text().splitlines()
        if line.startswith("  ") or line == "offsite-owner"
    )

    adapter_id = pushed["adapter_id"]
    export = work / "exports" / adapter_id[:16]
    export_argv = [*owner, "export", "--store", str(store), "--model", DEFAULT_MODEL, "--adapter-id", adapter_id]
    exported = last_json(command([*export_argv, "--out", str(export), "--json"], env, transcript))
    agreement = plug_in_agreement(store, adapter_id, export)

    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "sst2_shared.yaml").write_text(LM_EVAL_TASK.format(dev=SHARED_SST2_DEV))
    base_dir = next((store / "models").iterdir())  # the daemon's conversion of the GGUF: a plain HF directory
    scores = {
        "zero_shot": lm_eval(base_dir, tasks_dir, work / "lm_eval" / "base", env, transcript),
        "export": lm_eval(export, tasks_dir, work / "lm_eval" / "export", env, transcript),
    }
    return {
        "model": DEFAULT_MODEL,
        "emulator": EMULATOR,
        "train_examples": trained["examples"],
        "adapter_id": adapter_id,
        "banner": banner,
        "metrics_before_pull": before,
        "metrics_after_pull_and_push": after,
        "grpc": grpc_view,
        "daemon_exit_code_on_sigterm": exit_code,
        "export": {"out": exported.get("out"), **agreement},
        "lm_eval": scores,
        "lm_eval_task": LM_EVAL_TASK.format(dev="../shared/datasets/sst2/dev.tsv"),
        "transcript": transcript,
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores",
    }


def _examples(n_samples: int | dict[str, int]) -> int:
    """lm-eval's n-samples: a count, or (newer versions) {"original": N, "effective": N} after --limit."""
    return n_samples["effective"] if isinstance(n_samples, dict) else n_samples


def markdown(report: dict[str, Any]) -> str:
    scores = report["lm_eval"]
    rows = [
        f"| {name} | {s['acc'] * 100:.1f} ± {1.96 * s['acc_stderr'] * 100:.1f} | {_examples(s['n'])} |"
        for name, s in (
            ("base model (zero-shot)", scores["zero_shot"]),
            ("export (full model + adapter)", scores["export"]),
        )
    ]
    steps = "\n\n".join(
        f"```\n$ {step['command']}\n{step['stdout'] or step['stderr_tail']}\n```\n"
        f"(exit {step['exit']}, {step['seconds']} s)"
        for step in report["transcript"]
    )
    metric_diff = sorted(set(report["metrics_after_pull_and_push"]) - set(report["metrics_before_pull"]))
    return "\n".join(
        [
            f"# The operator's path on {report['model']} (emulator {report['emulator']}, {report['device']})",
            "",
            "Made by `python bench/ecosystem.py`. lm-evaluation-harness on its own SST-2 prompt (acc, ± 1.96 × its "
            "stderr), on the shared SST-2 dev rows. The adapter is LoRA trained by `offsite train`'s defaults on "
            f"{report['train_examples']} rows on a training-free emulator: this shows that the export works in the "
            "ecosystem's tools, not how much offsite-tuning gains (that is `bench/results/transfer.md`).",
            "",
            "| model | lm-eval acc (%) | n |",
            "|---|---:|---:|",
            *rows,
            "",
            f"Export loaded by plain transformers as `{report['export']['class']}` "
            f"({report['export']['parameters']:,} parameters); largest logit difference against the owner's plug-in "
            f"on a probe prompt: {report['export']['max_abs_logit_diff']:.2e}.",
            "",
            f"gRPC reflection lists {', '.join(report['grpc']['services'])}; health of offsite.v1.ModelOwner: "
            f"{report['grpc']['health']}. The daemon exited {report['daemon_exit_code_on_sigterm']} on SIGTERM.",
            "",
            "Banner:",
            "",
            f"```\n{report['banner']}\n```",
            "",
            "Metric lines that changed between before the pull and after the push:",
            "",
            "```\n" + "\n".join(metric_diff) + "\n```",
            "",
            "Transcript:",
            "",
            steps,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "ecosystem"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ecosystem"))
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from --out's JSON")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        report = json.loads(out.with_suffix(".json").read_text())
    else:
        report = run(Path(args.work))
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(re.sub(r"\n{3,}", "\n\n", markdown(report)))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
