"""Represent throughput: many small concurrent requests through the daemon against an in-process forward.

The same sequences (SST-2 dev prompts, tokenized) are represented three ways, in one run:
1. in process, one sequence per forward;
2. in process, REPRESENT_BATCH sequences per forward (what the server's batcher aims at);
3. through `Represent` on a daemon subprocess, from C concurrent clients (each its own tenant), one request per
   sequence.

    python bench/represent.py --clients 16 --sequences 256

writes bench/results/represent.{json,md}. The ratio to quote is (3) / (2): how close the wire comes to the
in-process batched forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from offsite.client.connection import Remote
from offsite.client.demo import start_owner
from offsite.common.contract import DEFAULT_MODEL, REPRESENT_BATCH
from offsite.common.examples import encode, read_jsonl
from offsite.common.model_loading import load_model
from offsite.common.pema.representation import LocalRepresenter
from offsite.common.rpc import pb
from offsite.owner.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "represent"


def in_process(representer: LocalRepresenter, sequences: list[list[int]], batch: int) -> float:
    started = time.perf_counter()
    for first in range(0, len(sequences), batch):
        representer.represent(sequences[first : first + batch])
    return time.perf_counter() - started


def over_the_wire(address: str, tokens: list[str], sequences: list[list[int]]) -> float:
    """Each client is its own tenant (a data owner), so per-tenant stream limits do not serialize them."""
    shares = [sequences[i :: len(tokens)] for i in range(len(tokens))]
    errors: list[BaseException] = []

    def client(token: str, share: list[list[int]]) -> None:
        try:
            with Remote(address, token) as remote:
                for ids in share:
                    list(remote.represent(iter([pb.RepresentRequest(token_ids=ids)])))
        except BaseException as error:  # surfaced below: a failed client must not look fast
            errors.append(error)

    threads = [threading.Thread(target=client, args=pair) for pair in zip(tokens, shares, strict=True)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed; first: {errors[0]}")
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offsite-represent-"))
    store = Store(work / "owner-store")
    run_id = int(time.time())
    tenant_tokens = [store.add_tenant(f"represent-{run_id}-{i}") for i in range(args.clients)]
    store.close()
    loaded = load_model(args.model, cache_dir=work / "owner-store" / "models")
    prompts = read_jsonl(ROOT / "client" / "data" / "sst2_dev.jsonl", limit=args.sequences)
    sequences = [encode(loaded.tokenizer, e.prompt, special=True) for e in prompts]
    tokens = sum(len(s) for s in sequences)
    representer = LocalRepresenter(loaded.model)
    with torch.inference_mode():
        one_by_one = in_process(representer, sequences, 1)
        batched = in_process(representer, sequences, REPRESENT_BATCH)
    del loaded, representer
    env = dict(os.environ, OFFSITE_HOME=str(work / "client-config"))
    owner, address = start_owner(args.model, work / "owner-store", args.emulator, work / "owner.log", env)
    try:
        wire = over_the_wire(address, tenant_tokens, sequences)
    finally:
        owner.terminate()
        owner.wait(60)
    rows = {
        "in process, 1 per forward": one_by_one,
        f"in process, {REPRESENT_BATCH} per forward": batched,
        f"Represent, {args.clients} concurrent clients": wire,
    }
    return {
        "model": args.model,
        "sequences": len(sequences),
        "tokens": tokens,
        "mean_tokens_per_sequence": round(tokens / len(sequences), 1),
        "clients": args.clients,
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "rows": {name: {"seconds": round(s, 2), "tokens_per_second": round(tokens / s, 1)} for name, s in rows.items()},
        "wire_over_in_process_batched": round(batched / wire, 3),
        "wire_over_in_process_unbatched": round(one_by_one / wire, 3),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Represent throughput on {result['model']}",
        "",
        f"{result['sequences']} SST-2 dev prompts ({result['tokens']} tokens, {result['mean_tokens_per_sequence']} "
        f"per sequence), final-layer states in float32. {result['device']}.",
        "",
        "| how | seconds | tokens/s |",
        "|---|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['seconds']} | {row['tokens_per_second']} |")
    lines += [
        "",
        f"Through the wire / in process batched: **{result['wire_over_in_process_batched']}×** of the throughput; "
        f"/ in process one at a time: {result['wire_over_in_process_unbatched']}×.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--emulator", default="uniform:2-8-2", help="what the daemon also serves (built if absent)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--workdir", help="keep the store here, e.g. one whose emulator is already built")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    write_results(out, result, markdown(result))


if __name__ == "__main__":
    main()
