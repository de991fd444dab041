"""PEMA on SmolLM2, Multi30k English→German, sacreBLEU; and PEMA's training cost against LoRA on the full model.

Rows, all trained on the same pairs, decoded greedily on the same test pairs with the same `--max-new-tokens`:
- zero-shot: the full model as it is;
- PEMA, constant λ: trained on the owner's representations (what `Represent` serves), λ = λ_max at every step;
- PEMA, Gradual Unrolling: the same adapter, λ = (λ_max − t·λ_max/L)² with L = max_new_tokens (never the
  reference length, which the released PEMA code uses and which leaks the answer);
- hybrid PEMA: trained on the emulator's representations (nothing left the data owner), applied with GU;
- LoRA on the emulator, plugged into the full model (the spine's offsite-tuning).

It runs in process: `Represent` returns exactly an in-process forward (tests/test_pema_rpc.py), so the wire changes
no number here. Generation uses a KV cache, which equals the uncached forward up to float rounding.
Efficiency: PEMA training (both phases, on the memory) against LoRA on every block of the full model, same pairs,
each in its own process so that its peak RSS is its own.

    python bench/pema.py --emulator runs/x/owner-store/emulators/<fp>/distill-2-8-2

writes bench/results/pema.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from tqdm import tqdm

from offsite.client.local_model import load_emulator
from offsite.client.training import lora as lora_training
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.client.training.loop import fit
from offsite.common.architectures import blocks, spec_for
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.examples import Example, encode, tokenize_for_training
from offsite.common.model_loading import ensure_pad_token, load_model
from offsite.common.pema.adapter import PemaAdapter
from offsite.common.pema.config import CONSTANT, GRADUAL, PemaConfig
from offsite.common.pema.generation import generate_pema
from offsite.common.pema.head import Head
from offsite.common.pema.memory import Memory
from offsite.common.pema.representation import LocalRepresenter, build_memory, teacher_forcing
from offsite.common.pema.training import train_pema
from offsite.common.scoring import causal_model
from offsite.owner.adapters.plugin import plug

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import TRANSLATION_PROMPT, multi30k  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pema"


def examples_of(pairs: Sequence[tuple[str, str]]) -> list[Example]:
    return [Example(prompt=TRANSLATION_PROMPT.format(en=en), completion=f" {de}") for en, de in pairs]


class CachedStep:
    """f(x) and log P_LM at the last position, feeding only the new tokens through a KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.last_block = blocks(causal_model(model))[-1]
        self.reset()

    def reset(self) -> None:
        self.past: Any = None
        self.seen = 0

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.last_block.register_forward_hook(
            lambda _m, _a, output: captured.append(output[0] if isinstance(output, tuple) else output)
        )
        try:
            new = torch.tensor([list(ids[self.seen :])])
            out = self.model(input_ids=new, past_key_values=self.past, use_cache=True)
        finally:
            handle.remove()
        self.past, self.seen = out.past_key_values, len(ids)
        return captured[-1][0, -1].float(), torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


@torch.inference_mode()
def greedy(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, desc: str) -> list[str]:
    step = CachedStep(model)
    outputs = []
    for prompt in tqdm(prompts, desc=desc, unit="sent"):
        step.reset()
        ids = encode(tokenizer, prompt, special=True)
        produced: list[int] = []
        for _ in range(max_new_tokens):
            _, log_probs = step(ids + produced)
            token = int(log_probs.argmax())
            if token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token]):
                break
            produced.append(token)
        outputs.append(first_line(tokenizer.decode(produced, skip_special_tokens=True)))
    return outputs


def pema_outputs(
    model: torch.nn.Module,
    tokenizer: Any,
    adapter: PemaAdapter,
    head: Head,
    config: PemaConfig,
    prompts: list[str],
    max_new_tokens: int,
    desc: str,
) -> list[str]:
    step = CachedStep(model)
    outputs = []
    for prompt in tqdm(prompts, desc=desc, unit="sent"):
        step.reset()
        ids = encode(tokenizer, prompt, special=True)
        produced: list[int] = []
        for token in generate_pema(step, adapter, head, config, ids, max_new_tokens, tokenizer.eos_token_id):
            if token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token]):
                break
            produced.append(token)
        outputs.append(first_line(tokenizer.decode(produced, skip_special_tokens=True)))
    return outputs


def bleu(hypotheses: list[str], references: list[str]) -> float:
    return round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure_pema_training(memory_dir: str, model: str, cache: str, config: PemaConfig, queue: Any) -> None:
    """In its own process: the head (from the model) and the memory are all PEMA training needs."""
    loaded = load_model(model, cache_dir=Path(cache))
    head = Head.from_model(loaded.model)
    del loaded
    started = time.perf_counter()
    train_pema(Memory.open(Path(memory_dir)), head, config, show_progress=False)
    queue.put({"seconds": time.perf_counter() - started, "peak_rss_mib": _peak_rss_mib()})


def measure_lora_training(model: str, cache: str, pairs: list[tuple[str, str]], queue: Any) -> None:
    """In its own process: LoRA r=8 on every block of the full model, one epoch over the same pairs."""
    loaded = load_model(model, cache_dir=Path(cache))
    config = TrainConfig()
    peft_model = lora_training.attach(
        loaded.model, spec_for(loaded.model.config), list(range(len(blocks(loaded.model)))), config
    )
    data = tokenize_for_training(loaded.tokenizer, examples_of(pairs), config.max_length)
    started = time.perf_counter()
    fit(peft_model, data, ensure_pad_token(loaded.tokenizer), config, False)
    queue.put({"seconds": time.perf_counter() - started, "peak_rss_mib": _peak_rss_mib()})


def in_child(target: Any, *args: Any) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offsite-pema-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = str(Path(args.model_cache) if args.model_cache else work / "models")
    loaded = load_model(args.model, cache_dir=Path(cache))
    full, tokenizer = loaded.model.eval(), loaded.tokenizer
    emulator, emulator_tokenizer, emulator_manifest = load_emulator(Path(args.emulator))
    train_pairs = multi30k("train", args.train)
    test_pairs = multi30k("test_2016_flickr", args.test)
    train_examples = examples_of(train_pairs)
    prompts = [TRANSLATION_PROMPT.format(en=en) for en, _ in test_pairs]
    references = [de for _, de in test_pairs]
    config = PemaConfig(max_epochs=args.pema_epochs, patience=1, lambda_max=args.lambda_max)
    rows: list[dict[str, Any]] = []

    def row(name: str, outputs: list[str], **extra: Any) -> None:
        rows.append({"row": name, "bleu": bleu(outputs, references), "sample": outputs[:3], **extra})
        print(f"[pema bench] {name}: BLEU {rows[-1]['bleu']}", file=sys.stderr)

    row("zero-shot (full model)", greedy(full, tokenizer, prompts, args.max_new_tokens, "zero-shot"))

    contexts = teacher_forcing(tokenizer, train_examples, args.max_length)
    owner_memory = build_memory(LocalRepresenter(full), contexts, work / "memory-owner", "float16", {})
    hybrid_memory = build_memory(LocalRepresenter(emulator), contexts, work / "memory-hybrid", "float16", {})
    head = Head.from_model(full)
    adapter, report = train_pema(owner_memory, head, config)
    hybrid_adapter, hybrid_report = train_pema(hybrid_memory, Head.from_model(emulator), config)
    facts = {"memory_rows": len(owner_memory), "validation_ce": round(report.phase2_validation_ce, 4)}
    constant, gradual = replace(config, schedule=CONSTANT), replace(config, schedule=GRADUAL)
    row(
        "PEMA, constant λ",
        pema_outputs(full, tokenizer, adapter, head, constant, prompts, args.max_new_tokens, "PEMA constant"),
        **facts,
    )
    row(
        "PEMA, Gradual Unrolling",
        pema_outputs(full, tokenizer, adapter, head, gradual, prompts, args.max_new_tokens, "PEMA GU"),
        **facts,
    )
    row(
        "hybrid PEMA (emulator memory), GU",
        pema_outputs(full, tokenizer, hybrid_adapter, head, gradual, prompts, args.max_new_tokens, "hybrid PEMA"),
        memory_rows=len(hybrid_memory),
        validation_ce=round(hybrid_report.phase2_validation_ce, 4),
    )
    lora_dir = work / "lora"
    trained = train_adapter(Path(args.emulator), train_examples, TrainConfig(train_blocks=args.train_blocks), lora_dir)
    plugged = plug(full, lora_dir, "lora")
    row(
        f"LoRA on the emulator ({emulator_manifest['id']}), plugged in",
        greedy(plugged, tokenizer, prompts, args.max_new_tokens, "LoRA plug-in"),
        train_seconds=round(trained.seconds, 1),
    )
    del plugged, emulator, emulator_tokenizer

    efficiency = {}
    if not args.skip_efficiency:
        pema_cost = in_child(measure_pema_training, str(work / "memory-owner"), args.model, cache, config)
        lora_cost = in_child(measure_lora_training, args.model, cache, train_pairs)
        efficiency = {
            "pema_training": pema_cost,
            "lora_full_model_training": lora_cost,
            "memory_ratio_pema_over_lora": round(pema_cost["peak_rss_mib"] / lora_cost["peak_rss_mib"], 3),
            "time_ratio_pema_over_lora": round(pema_cost["seconds"] / lora_cost["seconds"], 3),
        }
    return {
        "task": "Multi30k en→de",
        "model": loaded.name,
        "emulator": emulator_manifest["id"],
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "max_new_tokens": args.max_new_tokens,
        "pema": asdict(config),
        "device": f"CPU ({platform.machine()}), torch threads {torch.get_num_threads()}",
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "efficiency": efficiency,
    }


def markdown(result: dict[str, Any]) -> str:
    pema = result["pema"]
    lines = [
        f"# PEMA on {result['model']}: {result['task']}",
        "",
        f"{result['train_pairs']} training pairs, {result['test_pairs']} test pairs (test_2016_flickr), greedy, "
        f"at most {result['max_new_tokens']} new tokens, sacreBLEU. PEMA r={pema['rank']}, κ={pema['kappa']}, "
        f"λ_max={pema['lambda_max']}, at most {pema['max_epochs']} epochs per phase. Emulator: `{result['emulator']}`. "
        f"{result['device']}, {result['total_seconds']:.0f} s in all.",
        "",
        "| row | BLEU | first output |",
        "|---|---:|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['row']} | {row['bleu']} | {row['sample'][0]!r} |")
    if result["efficiency"]:
        e = result["efficiency"]
        lines += [
            "",
            "| training, same pairs | seconds | peak RSS MiB |",
            "|---|---:|---:|",
            f"| PEMA (both phases, on the memory) | {e['pema_training']['seconds']:.1f} "
            f"| {e['pema_training']['peak_rss_mib']:.0f} |",
            f"| LoRA r=8 on every block of the full model, 1 epoch | {e['lora_full_model_training']['seconds']:.1f} "
            f"| {e['lora_full_model_training']['peak_rss_mib']:.0f} |",
            "",
            f"PEMA / LoRA: memory **{e['memory_ratio_pema_over_lora']}×**, time {e['time_ratio_pema_over_lora']}×.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--model-cache", help="where converted models are kept (an owner store's models/)")
    parser.add_argument("--emulator", required=True, help="an emulator bundle of the same model")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pema-epochs", type=int, default=5)
    parser.add_argument("--lambda-max", type=float, default=PemaConfig.lambda_max)
    parser.add_argument("--train-blocks", default="top", choices=["all", "top", "bottom"])
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
