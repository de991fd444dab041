"""PEMA on SmolLM2: Multi30k English→German and E2E NLG data-to-text, sacreBLEU; PEMA's training cost against LoRA.

Rows of each task, all trained on the same examples, decoded greedily on the same test inputs with the same
`max_new_tokens`:
- zero-shot: the full model as it is;
- PEMA, constant λ: trained on the owner's representations (what `Represent` serves), λ = λ_max at every step;
- PEMA, Gradual Unrolling: the same adapter, λ = (λ_max − t·λ_max/L)² with L = max_new_tokens (never the
  reference length, which the released PEMA code uses and which leaks the answer);
- hybrid PEMA: trained on the emulator's representations (nothing left the data owner), applied with GU;
- LoRA on the emulator, plugged into the full model (the spine's offsite-tuning).

Translation trains on the first `--train` Multi30k pairs and tests on `test_2016_flickr`. Data-to-text trains on
`--e2e-train` (meaning representation, reference) rows drawn from E2E's `devset.csv` and tests on every distinct
input of `testset_w_refs.csv` against all of its references.

It runs in process: `Represent` returns exactly an in-process forward (tests/test_pema_rpc.py), so the wire changes
no number here. Decoding runs `--batch` prompts at a time with left padding and a KV cache; the PEMA rows apply the
same `mix`/`unrolling_lambda` as `generate_pema` to the whole batch, whose rows share the step index.
Efficiency: PEMA training (both phases, on the translation memory) against LoRA on every block of the full model,
same pairs, each in its own process so that its peak RSS is its own.

    python bench/pema.py --emulator runs/x/owner-store/emulators/<fp>/distill-2-8-2

writes bench/results/pema.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
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
from offsite.common.pema.head import Head
from offsite.common.pema.memory import Memory
from offsite.common.pema.representation import LocalRepresenter, build_memory, teacher_forcing
from offsite.common.pema.training import train_pema
from offsite.common.pema.unrolling import mix, unrolling_lambda
from offsite.common.scoring import causal_model
from offsite.owner.adapters.plugin import plug

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import write_results  # noqa: E402
from shared_data import E2E_PROMPT, TRANSLATION_PROMPT, e2e, multi30k  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pema"

# (step index, f(x) of every row, log P_LM of every row) -> the next token of every row
Chooser = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    prompts: list[str]
    references: list[list[str]]
    max_new_tokens: int
    about: str


def translation_task(train: int, test: int, max_new_tokens: int) -> Task:
    train_pairs = multi30k("train", train)
    test_pairs = multi30k("test_2016_flickr", test)
    return Task(
        name="Multi30k en→de",
        train=[Example(prompt=TRANSLATION_PROMPT.format(en=en), completion=f" {de}") for en, de in train_pairs],
        prompts=[TRANSLATION_PROMPT.format(en=en) for en, _ in test_pairs],
        references=[[de] for _, de in test_pairs],
        max_new_tokens=max_new_tokens,
        about=f"{len(train_pairs)} training pairs (train), {len(test_pairs)} test pairs (test_2016_flickr)",
    )


def data_to_text_task(train: int, test: int | None, max_new_tokens: int, seed: int = 0) -> Task:
    rows = [(mr, ref) for mr, refs in e2e("devset") for ref in refs]
    random.Random(seed).shuffle(rows)
    rows = rows[:train]
    test_items = e2e("testset_w_refs", test)
    return Task(
        name="E2E NLG data-to-text",
        train=[Example(prompt=E2E_PROMPT.format(mr=mr), completion=f" {ref}") for mr, ref in rows],
        prompts=[E2E_PROMPT.format(mr=mr) for mr, _ in test_items],
        references=[refs for _, refs in test_items],
        max_new_tokens=max_new_tokens,
        about=(
            f"{len(rows)} training rows (devset, shuffled with seed {seed}), {len(test_items)} distinct test inputs "
            f"(testset_w_refs) with {sum(map(len, (refs for _, refs in test_items)))} references"
        ),
    )


def language_model_choice(_step: int, _states: torch.Tensor, lm_log_probs: torch.Tensor) -> torch.Tensor:
    return lm_log_probs.argmax(dim=-1)


def pema_choice(adapter: PemaAdapter, head: Head, config: PemaConfig, length: int) -> Chooser:
    adapter.eval()

    def choose(step: int, states: torch.Tensor, lm_log_probs: torch.Tensor) -> torch.Tensor:
        weight = unrolling_lambda(step, length, config.lambda_max, config.schedule)
        return mix(adapter.log_probs(states, head), lm_log_probs, weight).argmax(dim=-1)

    return choose


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


class BatchedGreedy:
    """Greedy decoding of `batch_size` prompts at a time: left padding, one KV cache, and f(x) (the last block's
    output, before the final norm) taken by a hook. A row ends at end-of-text or at a token holding a newline."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.last_block = blocks(causal_model(model))[-1]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._ends: dict[int, bool] = {}

    def ends(self, token: int) -> bool:
        if token not in self._ends:
            self._ends[token] = token == self.tokenizer.eos_token_id or "\n" in self.tokenizer.decode([token])
        return self._ends[token]

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, choose: Chooser, desc: str) -> list[str]:
        outputs: list[str] = []
        with tqdm(total=len(prompts), desc=desc, unit="input") as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                outputs += self.decode_batch(batch, max_new_tokens, choose)
                bar.update(len(batch))
        return outputs

    @torch.inference_mode()
    def decode_batch(self, prompts: Sequence[str], max_new_tokens: int, choose: Chooser) -> list[str]:
        encoded = [encode(self.tokenizer, prompt, special=True) for prompt in prompts]
        width = max(map(len, encoded))
        ids = torch.tensor([[self.pad_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        captured: list[torch.Tensor] = []
        handle = self.last_block.register_forward_hook(
            lambda _m, _a, output: captured.append((output[0] if isinstance(output, tuple) else output)[:, -1])
        )
        produced: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        past: Any = None
        try:
            for step in range(max_new_tokens):
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
                )
                past = out.past_key_values
                tokens = choose(step, captured.pop().float(), torch.log_softmax(out.logits[:, -1].float(), dim=-1))
                for row, token in enumerate(tokens.tolist()):
                    if not finished[row]:
                        finished[row] = self.ends(token)
                        if not finished[row]:
                            produced[row].append(token)
                if all(finished):
                    break
                ids = tokens[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = positions[:, -1:] + 1
        finally:
            handle.remove()
        return [first_line(self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in produced]


def key_agreement(owner: Memory, hybrid: Memory, sample: int = 5000) -> dict[str, float]:
    """How close the emulator's f(c) comes to the full model's for the same contexts (the memories are row-aligned):
    a hybrid adapter is trained on the one and applied to the other."""
    rows = np.sort(np.random.default_rng(0).choice(len(owner), min(sample, len(owner)), replace=False))
    full = torch.from_numpy(np.asarray(owner.keys[rows], dtype=np.float32))
    emulated = torch.from_numpy(np.asarray(hybrid.keys[rows], dtype=np.float32))
    return {
        "median_cosine": round(float(torch.nn.functional.cosine_similarity(emulated, full, dim=1).median()), 3),
        "median_relative_l2": round(float(((emulated - full).norm(dim=1) / full.norm(dim=1)).median()), 3),
    }


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus sacreBLEU; inputs with fewer references than the most have `None` in the missing streams."""
    most = max(map(len, references))
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return round(sacrebleu.corpus_bleu(hypotheses, streams).score, 2)


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


def measure_lora_training(model: str, cache: str, examples: list[Example], queue: Any) -> None:
    """In its own process: LoRA r=8 on every block of the full model, one epoch over the same examples."""
    loaded = load_model(model, cache_dir=Path(cache))
    config = TrainConfig()
    peft_model = lora_training.attach(
        loaded.model, spec_for(loaded.model.config), list(range(len(blocks(loaded.model)))), config
    )
    data = tokenize_for_training(loaded.tokenizer, examples, config.max_length)
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


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="offsite-pema-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = str(Path(args.model_cache) if args.model_cache else self.work / "models")
        loaded = load_model(args.model, cache_dir=Path(self.cache))
        self.model_name = loaded.name
        self.full, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.emulator, _, self.emulator_manifest = load_emulator(Path(args.emulator))
        self.config = PemaConfig(max_epochs=args.pema_epochs, patience=1, lambda_max=args.lambda_max)
        self.head = Head.from_model(self.full)
        self.decode = BatchedGreedy(self.full, self.tokenizer, args.batch)

    def task(self, task: Task, slug: str) -> dict[str, Any]:
        started = time.perf_counter()
        work = self.work / slug
        rows: list[dict[str, Any]] = []

        def row(name: str, outputs: list[str], **extra: Any) -> None:
            rows.append({"row": name, "bleu": bleu(outputs, task.references), "sample": outputs[:3], **extra})
            print(f"[pema bench] {task.name}, {name}: BLEU {rows[-1]['bleu']}", file=sys.stderr)

        length = task.max_new_tokens
        row("zero-shot (full model)", self.decode(task.prompts, length, language_model_choice, "zero-shot"))

        contexts = teacher_forcing(self.tokenizer, task.train, self.args.max_length)
        owner_memory = build_memory(LocalRepresenter(self.full), contexts, work / "memory-owner", "float16", {})
        hybrid_memory = build_memory(LocalRepresenter(self.emulator), contexts, work / "memory-hybrid", "float16", {})
        adapter, report = train_pema(owner_memory, self.head, self.config)
        hybrid_adapter, hybrid_report = train_pema(hybrid_memory, Head.from_model(self.emulator), self.config)
        facts = {"memory_rows": len(owner_memory), "validation_ce": round(report.phase2_validation_ce, 4)}
        constant, gradual = replace(self.config, schedule=CONSTANT), replace(self.config, schedule=GRADUAL)
        for name, config in (("PEMA, constant λ", constant), ("PEMA, Gradual Unrolling", gradual)):
            choose = pema_choice(adapter, self.head, config, length)
            row(name, self.decode(task.prompts, length, choose, name), **facts)
        row(
            "hybrid PEMA (emulator memory), GU",
            self.decode(task.prompts, length, pema_choice(hybrid_adapter, self.head, gradual, length), "hybrid PEMA"),
            memory_rows=len(hybrid_memory),
            validation_ce=round(hybrid_report.phase2_validation_ce, 4),
            keys_against_owner=key_agreement(owner_memory, hybrid_memory),
        )
        lora_dir = work / "lora"
        trained = train_adapter(
            Path(self.args.emulator), task.train, TrainConfig(train_blocks=self.args.train_blocks), lora_dir
        )
        plugged = plug(self.full, lora_dir, "lora")
        row(
            f"LoRA on the emulator ({self.emulator_manifest['id']}), plugged in",
            BatchedGreedy(plugged, self.tokenizer, self.args.batch)(
                task.prompts, length, language_model_choice, "LoRA plug-in"
            ),
            train_seconds=round(trained.seconds, 1),
        )
        return {
            "task": task.name,
            "data": task.about,
            "max_new_tokens": length,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }

    def efficiency(self, task: Task) -> dict[str, Any]:
        memory = str(self.work / "translation" / "memory-owner")
        pema_cost = in_child(measure_pema_training, memory, self.args.model, self.cache, self.config)
        lora_cost = in_child(measure_lora_training, self.args.model, self.cache, task.train)
        return {
            "examples": len(task.train),
            "pema_training": pema_cost,
            "lora_full_model_training": lora_cost,
            "memory_ratio_pema_over_lora": round(pema_cost["peak_rss_mib"] / lora_cost["peak_rss_mib"], 3),
            "time_ratio_pema_over_lora": round(pema_cost["seconds"] / lora_cost["seconds"], 3),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    bench = Bench(args)
    translation = translation_task(args.train, args.test, args.max_new_tokens)
    tasks = [bench.task(translation, "translation")]
    if not args.skip_e2e:
        data_to_text = data_to_text_task(args.e2e_train, args.e2e_test, args.e2e_max_new_tokens)
        tasks.append(bench.task(data_to_text, "data-to-text"))
    return {
        "model": bench.model_name,
        "emulator": bench.emulator_manifest["id"],
        "pema": asdict(bench.config),
        "decoding": f"greedy, batches of {args.batch} with left padding and a KV cache",
        "device": f"CPU ({platform.machine()}), torch threads {torch.get_num_threads()}",
        "total_seconds": round(time.perf_counter() - started, 1),
        "tasks": tasks,
        "efficiency": {} if args.skip_efficiency else bench.efficiency(translation),
    }


def markdown(result: dict[str, Any]) -> str:
    pema = result["pema"]
    lines = [
        f"# PEMA on {result['model']}",
        "",
        f"PEMA r={pema['rank']}, κ={pema['kappa']}, λ_max={pema['lambda_max']}, at most {pema['max_epochs']} epochs "
        f"per phase; Gradual Unrolling takes L = max_new_tokens. Emulator: `{result['emulator']}`. "
        f"{result['decoding']}, sacreBLEU. {result['device']}, {result['total_seconds']:.0f} s in all.",
    ]
    for task in result["tasks"]:
        lines += [
            "",
            f"## {task['task']}",
            "",
            f"{task['data']}; at most {task['max_new_tokens']} new tokens; {task['seconds']:.0f} s.",
            "",
            "| row | BLEU | first output |",
            "|---|---:|---|",
        ]
        lines += [f"| {row['row']} | {row['bleu']} | {row['sample'][0]!r} |" for row in task["rows"]]
    if result["efficiency"]:
        e = result["efficiency"]
        lines += [
            "",
            f"## Training cost, the same {e['examples']} translation pairs",
            "",
            "| training | seconds | peak RSS MiB |",
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
    parser.add_argument("--train", type=int, default=2000, help="Multi30k training pairs")
    parser.add_argument("--test", type=int, default=1000, help="Multi30k test pairs")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--e2e-train", type=int, default=2000, help="E2E devset rows to train on")
    parser.add_argument("--e2e-test", type=int, help="E2E distinct test inputs (default: all)")
    parser.add_argument("--e2e-max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--batch", type=int, default=32, help="prompts decoded at once")
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
    write_results(out, result, markdown(result))


if __name__ == "__main__":
    main()
