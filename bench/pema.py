"""PEMA on SmolLM2 against fair baselines: E2E NLG data-to-text and Multi30k English→German, sacreBLEU and chrF.

Every row trains on the same examples and decodes the same test prompts with the one token loop
(common/generation), greedily, stopping on end-of-text or a newline, with the same `max_new_tokens`:
- zero_shot: the full model as it is;
- pema_constant, pema_gu, pema_gate: one PEMA adapter trained on the owner's representations (what `Represent`
  serves), run with λ = λ_max, with Gradual Unrolling (L predicted from the prompt by the adapter), and with the
  learned gate;
- pema_gu_oracle_length: the same, with L the reference's length: an upper bound that leaks the answer, marked so;
- hybrid: PEMA trained on a memory the pulled emulator built on the data owner's machine, through the owner's
  bridge (owner/emulator/bridge.py, fitted here on the owner's public text), run on the full model's states with
  GU, as pema_gu is; hybrid_constant: the same adapter with λ = λ_max, as pema_constant is; hybrid_no_bridge: GU
  without the bridge (first seed only); hybrid_key_noise, hybrid_key_noise_constant: the hybrid trained with key
  noise (`--key-noise` × the bridge's residual covariance; common/pema/training.py), GU and λ = λ_max;
  hybrid_reads_emulator, hybrid_reads_emulator_constant: the hybrid adapter reading, at generation too, the bridged
  emulator's states (the keys it learned on) while P_LM stays the full model's (common/generation/steppers.py's
  ReadingStepper; `offsite generate --emulator`), GU and λ = λ_max; hybrid_reads_emulator_chosen: the same at the
  constant λ that `bench/pema_key_noise.py --reading-lambdas` chose per task on held-out examples;
- lora_emulator_plug_in: LoRA trained on the emulator and plugged into the full model (offsite-tuning);
  lora_emulator_proxy: the same adapter served by proxy-tuning, the full model's log-probs steered by what the
  adapter changes on the emulator; lora_emulator_every_proxy: LoRA on every emulator block, served by proxy-tuning
  (it cannot plug in). All three keep the data owner's data on its machine, as the hybrid does;
- lora_full: the ceiling, LoRA on every block of the full model, same recipe.
The PEMA rank is chosen per task on the memory's held-out examples (never the test split). Each trained row runs
with `--seeds`; intervals resample seeds and test inputs (common/confidence.py) over sacreBLEU's sufficient
statistics, and two rows are compared paired on the same inputs.

Every cell (task × row × seed) is cached in bench/results/pema_cells/ with its outputs; rerunning skips what is
done, so the benchmark runs in pieces. `--report` rebuilds bench/results/pema.{json,md,png} from the cells.
The rows that depend on the emulator run on `--emulator` (the product's default); the others are shared, so
`--emulator distill:2-8-2 --out bench/results/pema_distill_2-8-2 --report` rebuilds the older emulator's report.

    python bench/pema.py --tasks e2e --seeds 0            # one piece
    python bench/pema.py --report                         # tables, targets and plot from every cell
    python bench/pema.py --smoke                          # tiny model, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF

from offsite.client.training import lora, train_adapter
from offsite.client.training.config import EVERY_BLOCK, TrainConfig
from offsite.client.training.loop import fit
from offsite.common import confidence as stats
from offsite.common.architectures import depth, spec_for
from offsite.common.bridge import Bridge, BridgedRepresenter
from offsite.common.contract import DEFAULT_EMULATOR, DEFAULT_MODEL
from offsite.common.emulator_loading import load_emulator, plug_into_emulator
from offsite.common.examples import Example, encode, tokenize_for_training
from offsite.common.generation.loop import complete, model_policy
from offsite.common.generation.sampling import SamplingConfig
from offsite.common.generation.steppers import LocalStepper, ReadingStepper, Stepper, stepper_for
from offsite.common.model_loading import ensure_pad_token, fingerprint, load_model
from offsite.common.pema.adapter import PemaAdapter
from offsite.common.pema.bundle import load_pema, save_pema
from offsite.common.pema.config import CONSTANT, GATE, GRADUAL, HYBRID_KEY_NOISE, PemaConfig
from offsite.common.pema.head import Head
from offsite.common.pema.memory import Memory
from offsite.common.pema.policy import pema_policy
from offsite.common.pema.representation import LocalRepresenter, build_memory, teacher_forcing
from offsite.common.pema.training import train_pema
from offsite.common.proxy_tuning import ProxyTuned
from offsite.owner.adapters.plugin import plug
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.bridge import build_bridge
from offsite.owner.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import Cells  # noqa: E402
from results_files import write_results  # noqa: E402
from shared_data import E2E_PROMPT, TRANSLATION_PROMPT, e2e, multi30k  # noqa: E402
from threads import one_thread_if  # noqa: E402
from transfer import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pema"
CELLS = ROOT / "bench" / "results" / "pema_cells"
TASKS = ("e2e", "multi30k_en_de")
ROWS = (
    "zero_shot",
    "pema_constant",
    "pema_gu",
    "pema_gate",
    "pema_gu_oracle_length",
    "hybrid",
    "hybrid_constant",
    "hybrid_no_bridge",
    "hybrid_key_noise",
    "hybrid_key_noise_constant",
    "hybrid_reads_emulator",
    "hybrid_reads_emulator_constant",
    "hybrid_reads_emulator_chosen",
    "lora_emulator_plug_in",
    "lora_emulator_proxy",
    "lora_emulator_every_proxy",
    "lora_full",
)
PEMA_ROWS = {"pema_constant": CONSTANT, "pema_gu": GRADUAL, "pema_gate": GATE}
# each hybrid row against the remote row of the same schedule: the 80%-of-the-gain targets
HYBRID_VERSUS_REMOTE = (
    ("hybrid", "pema_gu", "GU"),
    ("hybrid_constant", "pema_constant", "constant λ"),
    ("hybrid_key_noise", "pema_gu", "key noise, GU"),
    ("hybrid_key_noise_constant", "pema_constant", "key noise, constant λ"),
    ("hybrid_reads_emulator", "pema_gu", "reading the emulator, GU"),
    ("hybrid_reads_emulator_constant", "pema_constant", "reading the emulator, constant λ"),
    ("hybrid_reads_emulator_chosen", "pema_constant", "reading the emulator, λ chosen on held-out examples"),
)


class LoraEmulatorRow(NamedTuple):
    every_block: bool  # LoRA on every emulator block (`--train-blocks every`), not the recipe's top blocks
    proxy: bool  # served by proxy-tuning (common/proxy_tuning.py), not plugged into the full model


# LoRA trained on the emulator by the data owner, as the owner can serve it (owner/adapters/delivery.py)
LORA_EMULATOR_ROWS = {
    "lora_emulator_plug_in": LoraEmulatorRow(every_block=False, proxy=False),
    "lora_emulator_proxy": LoraEmulatorRow(every_block=False, proxy=True),
    "lora_emulator_every_proxy": LoraEmulatorRow(every_block=True, proxy=True),
}


class HybridRow(NamedTuple):
    source: str  # the memory: "hybrid" (bridged emulator states) or "emulator" (unbridged)
    schedule: str
    key_noise: bool  # trained with the bridge's residual as key noise
    reads_emulator: bool  # at generation PEMA reads the bridged emulator's states, not the full model's
    chosen_lambda: bool = False  # constant λ from --reading-lambda-file (chosen on held-out examples), not λ_max


HYBRID_ROWS = {
    "hybrid": HybridRow("hybrid", GRADUAL, False, False),
    "hybrid_constant": HybridRow("hybrid", CONSTANT, False, False),
    "hybrid_no_bridge": HybridRow("emulator", GRADUAL, False, False),
    "hybrid_key_noise": HybridRow("hybrid", GRADUAL, True, False),
    "hybrid_key_noise_constant": HybridRow("hybrid", CONSTANT, True, False),
    "hybrid_reads_emulator": HybridRow("hybrid", GRADUAL, False, True),
    "hybrid_reads_emulator_constant": HybridRow("hybrid", CONSTANT, False, True),
    "hybrid_reads_emulator_chosen": HybridRow("hybrid", CONSTANT, False, True, chosen_lambda=True),
}
READING_LAMBDA_FILE = ROOT / "bench" / "results" / "pema_reading_lambda.json"
RANKS = (64, 128, 256)  # the bottleneck sweep; d = 576 on SmolLM2-135M
STOP = ("\n",)  # every task answers in one line


@dataclass(frozen=True)
class Task:
    slug: str
    name: str
    train: list[Example]
    prompts: list[str]
    references: list[list[str]]
    max_new_tokens: int
    about: str

    def digest(self) -> str:
        body = json.dumps([[asdict(e) for e in self.train], self.prompts, self.references], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def _subset(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed random subset, in file order (the first rows of a file are rarely a fair sample)."""
    if not limit or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def translation_task(train: int, test: int | None, max_new_tokens: int) -> Task:
    pairs = multi30k("train")
    random.Random(0).shuffle(pairs)
    test_pairs = _subset(multi30k("test_2016_flickr"), test)
    return Task(
        slug="multi30k_en_de",
        name="Multi30k en→de",
        train=[Example(prompt=TRANSLATION_PROMPT.format(en=en), completion=f" {de}") for en, de in pairs[:train]],
        prompts=[TRANSLATION_PROMPT.format(en=en) for en, _ in test_pairs],
        references=[[de] for _, de in test_pairs],
        max_new_tokens=max_new_tokens,
        about=f"{train} training pairs (train, shuffled with seed 0), {len(test_pairs)} test pairs "
        "(test_2016_flickr, a fixed random subset)",
    )


def data_to_text_task(train: int, test: int | None, max_new_tokens: int) -> Task:
    rows = [(mr, ref) for mr, refs in e2e("devset") for ref in refs]
    random.Random(0).shuffle(rows)
    test_items = _subset(e2e("testset_w_refs"), test)
    return Task(
        slug="e2e",
        name="E2E NLG data-to-text",
        train=[Example(prompt=E2E_PROMPT.format(mr=mr), completion=f" {ref}") for mr, ref in rows[:train]],
        prompts=[E2E_PROMPT.format(mr=mr) for mr, _ in test_items],
        references=[refs for _, refs in test_items],
        max_new_tokens=max_new_tokens,
        about=f"{train} training rows (devset, shuffled with seed 0), {len(test_items)} distinct test inputs "
        f"(testset_w_refs, a fixed random subset) with {sum(len(r) for _, r in test_items)} references",
    )


# ---- metrics: sacreBLEU and chrF from per-input sufficient statistics, so that inputs can be resampled


METRICS: dict[str, Callable[[], Any]] = {"bleu": BLEU, "chrf": CHRF}


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    most = max(map(len, references))
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]


def sentence_statistics(metric: str, outputs: list[str], references: list[list[str]]) -> np.ndarray:
    """[inputs, k]: what sacreBLEU sums over a corpus before it scores."""
    scorer = METRICS[metric]()
    return np.asarray(scorer._extract_corpus_statistics(outputs, _streams(references)), dtype=float)


def corpus_score(metric: str, summed: np.ndarray) -> float:
    return float(METRICS[metric]()._compute_score_from_stats(list(summed)).score)


def corpus_estimate(metric: str, per_seed: np.ndarray) -> stats.Estimate:
    """Mean over seeds of the corpus score, its bootstrap CI over seeds and inputs; `per_seed`: seeds × inputs × k."""
    return stats.statistic_estimate(per_seed, lambda summed: corpus_score(metric, summed))


def corpus_compare(metric: str, a: np.ndarray, b: np.ndarray, same_seeds: bool = False) -> stats.Comparison:
    return stats.statistic_compare(a, b, lambda summed: corpus_score(metric, summed), same_seeds)


# ---- the benchmark


def say(text: str) -> None:
    print(f"[pema bench] {text}", file=sys.stderr, flush=True)


class PemaBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cells = Cells(Path(args.cells))
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = Store(Path(args.store))
        loaded = load_model(args.model, cache_dir=self.store.models_dir)
        self.model_name, self.full, self.tokenizer = loaded.name, loaded.model.eval(), loaded.tokenizer
        self.fingerprint = fingerprint(self.full)
        self.head = Head.from_model(self.full)
        self.recipe = replace(load_recipe(), max_length=args.max_length, epochs=args.lora_epochs)
        spec = EmulatorSpec.parse(args.emulator)
        self.emulator_dir = self.store.emulator_dir(self.fingerprint, spec.id)
        if not (self.emulator_dir / "offsite.json").is_file():
            say(f"building emulator {args.emulator} (cached in {self.emulator_dir})")
            build_emulator(
                self.full,
                self.tokenizer,
                spec,
                self.emulator_dir,
                self.store.signing_key(),
                self.fingerprint,
                self.model_name,
                show_progress=args.progress,
            )
        self.emulator, _, self.emulator_manifest = load_emulator(self.emulator_dir)
        self._bridge: tuple[Bridge, dict[str, Any]] | None = None

    def bridge(self) -> tuple[Bridge, dict[str, Any]]:
        """The owner's bridge for this emulator, fitted once on the owner's public text and cached."""
        if self._bridge is None:
            path = self.work / f"bridge-{self.emulator_manifest['id']}.safetensors"
            facts_file = path.with_suffix(".json")
            if not facts_file.is_file():
                say("fitting the owner's bridge on public text")
                started = time.perf_counter()
                published = build_bridge(self.full, self.emulator, self.tokenizer)
                published.bridge.save(path)
                facts = {**published.facts, "card": published.card.as_dict()}
                facts["seconds"] = round(time.perf_counter() - started, 1)
                facts_file.write_text(json.dumps(facts, indent=1) + "\n")
            hidden = int(self.full.config.hidden_size)
            self._bridge = Bridge.load(path, hidden), json.loads(facts_file.read_text())
        return self._bridge

    def key_noise(self, scale: float) -> torch.Tensor | None:
        """`scale` × the bridge's residual factor: hybrid PEMA's training noise (None at scale 0)."""
        if not scale:
            return None
        residual = self.bridge()[0].residual
        if residual is None:
            raise SystemExit(f"the cached bridge in {self.work} has no residual: delete bridge-* there to refit")
        return residual * scale

    # -- helpers

    def facts(self, task: Task, row: str, **extra: Any) -> dict[str, Any]:
        return {
            "task": task.slug,
            "row": row,
            "model": self.fingerprint[:16],
            "task_digest": task.digest(),
            "max_new_tokens": task.max_new_tokens,
            "stop": list(STOP),
            **extra,
        }

    def decode(
        self,
        model: torch.nn.Module,
        task: Task,
        policy_for: Callable[[int], Any],
        desc: str,
        reads_emulator: bool = False,
    ) -> dict:
        """Greedy outputs of every test prompt, `--batch` at a time; `policy_for(first)` gives the batch's policy.
        `reads_emulator`: the policy reads the bridged emulator's states, P_LM stays `model`'s."""
        sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, stop=STOP)
        outputs, finishes = [], []
        started = time.perf_counter()
        for first in range(0, len(task.prompts), self.args.batch):
            batch = task.prompts[first : first + self.args.batch]
            ids = [encode(self.tokenizer, p, special=True) for p in batch]
            stepper: Stepper = stepper_for(model)
            if reads_emulator:
                stepper = ReadingStepper(stepper, LocalStepper(self.emulator), self.bridge()[0].apply)
            done = complete(stepper, ids, policy_for(first), sampling, self.tokenizer.eos_token_id, self.tokenizer)
            outputs += [c.text.strip() for c in done]
            finishes += [c.finish for c in done]
            say(f"{task.slug} {desc}: {len(outputs)}/{len(task.prompts)}")
        return {
            "outputs": outputs,
            "finish": finishes,
            "hit_limit_fraction": finishes.count("length") / len(finishes),
            "decode_seconds": round(time.perf_counter() - started, 1),
        }

    def memory(self, task: Task, source: str) -> tuple[Memory, float]:
        """The owner's memory (full-model states), the hybrid's (emulator states, bridged) or the unbridged hybrid's,
        cached on disk."""
        directory = self.work / f"{task.slug}-{task.digest()}-{source}-{self.emulator_manifest['id']}"
        seconds_file = directory.with_suffix(".seconds")
        if not (directory / "memory.json").is_file():
            started = time.perf_counter()
            representer: Any = LocalRepresenter(self.full if source == "owner" else self.emulator)
            if source == "hybrid":
                representer = BridgedRepresenter(representer, self.bridge()[0])
            contexts = teacher_forcing(self.tokenizer, task.train, self.args.max_length)
            build_memory(representer, contexts, directory, "float16", {"source": source})
            seconds_file.write_text(f"{time.perf_counter() - started:.1f}\n")
        return Memory.open(directory), float(seconds_file.read_text())

    def pema(
        self, task: Task, source: str, seed: int, rank: int, key_noise: float = 0.0
    ) -> tuple[PemaAdapter, PemaConfig, dict]:
        """One PEMA adapter (with its gate and length predictor), cached as a bundle; `key_noise` scales the
        bridge's residual factor as training noise (hybrid memories only)."""
        config = replace(self.pema_config, rank=rank, seed=seed)
        noise_tag = f"-noise{key_noise:g}" if key_noise else ""
        directory = self.work / f"{task.slug}-{task.digest()}-{source}-pema-r{rank}-s{seed}{noise_tag}"
        facts_file = directory / "training.json"
        memory, memory_seconds = self.memory(task, source)
        if not facts_file.is_file():
            head = self.head  # the emulator's final norm and head are the full model's own
            noise = self.key_noise(key_noise)
            adapter, report = train_pema(memory, head, config, show_progress=self.args.progress, key_noise=noise)
            directory.mkdir(parents=True, exist_ok=True)
            save_pema(adapter, config, directory)
            facts = {
                "memory_rows": len(memory),
                "memory_seconds": memory_seconds,
                "train_seconds": round(report.seconds, 1),
                "validation_ce": round(report.phase2_validation_ce, 4),
                "model_validation_ce": round(report.model_validation_ce, 4),
                "phase1_epochs": report.phase1.epochs,
                "phase2_epochs": report.phase2.epochs,
                "gate_validation_nll": min(report.gate.validation_loss) if report.gate else None,
                "length_mae_tokens": report.length_mae_tokens,
            }
            facts_file.write_text(json.dumps(facts, indent=1) + "\n")
        adapter, config = load_pema(directory)
        # λ_max only steers generation, and the directory does not name it: generate with this run's, as facts say
        config = replace(config, lambda_max=self.pema_config.lambda_max)
        return adapter, config, json.loads(facts_file.read_text())

    @property
    def pema_config(self) -> PemaConfig:
        return PemaConfig(max_epochs=self.args.pema_epochs, lambda_max=self.args.lambda_max)

    # -- selection on held-out examples of the memory

    def rank(self, task: Task) -> int:
        facts = self.facts(task, "selection_rank", ranks=list(self.args.ranks), pema=asdict(self.pema_config))
        cell = self.cells.get(facts)
        if cell is None:
            trials = {str(r): self.pema(task, "owner", 0, r)[2]["validation_ce"] for r in self.args.ranks}
            best = min(trials, key=trials.get)
            cell = self.cells.put(facts, {"validation_ce": trials, "rank": int(best), "on": "held-out examples"})
        return int(cell["rank"])

    # -- rows

    def zero_shot(self, task: Task) -> dict[str, Any]:
        facts = self.facts(task, "zero_shot")
        cell = self.cells.get(facts)
        if cell is None:
            shortest = [
                min(len(encode(self.tokenizer, f" {r}", special=False)) for r in refs) for refs in task.references
            ]
            long_references = sum(n + 1 >= task.max_new_tokens for n in shortest) / len(shortest)  # + end-of-text
            decoded = self.decode(self.full, task, lambda _first: model_policy, "zero-shot")
            cell = self.cells.put(facts, {"seed": 0, **decoded, "long_reference_fraction": long_references})
        return cell

    def pema_rows(self, task: Task, seed: int) -> list[dict[str, Any]]:
        rank = self.rank(task)
        out = []
        for row, schedule in [*PEMA_ROWS.items(), ("pema_gu_oracle_length", GRADUAL)]:
            facts = self.facts(task, row, seed=seed, rank=rank, pema=asdict(self.pema_config))
            cell = self.cells.get(facts)
            if cell is None:
                adapter, config, training = self.pema(task, "owner", seed, rank)
                oracle = self.oracle_lengths(task) if row == "pema_gu_oracle_length" else None

                def policy_for(first: int, a=adapter, c=config, s=schedule, o=oracle) -> Any:
                    lengths = o[first : first + self.args.batch] if o is not None else None
                    return pema_policy(a, self.head, replace(c, schedule=s), task.max_new_tokens, lengths)

                decoded = self.decode(self.full, task, policy_for, f"{row} seed {seed}")
                cell = self.cells.put(facts, {"seed": seed, **decoded, **training})
            out.append(cell)
        return out

    def oracle_lengths(self, task: Task) -> list[int]:
        """The first reference's length in tokens (end-of-text included): what the reference code's L is."""
        return [len(encode(self.tokenizer, f" {refs[0]}", special=False)) + 1 for refs in task.references]

    def hybrid(self, task: Task, seed: int, row: str) -> dict[str, Any]:
        """Run with GU as pema_gu is, or with constant λ as pema_constant is: the targets compare like with like."""
        rank = self.rank(task)
        source, schedule, noisy, reads_emulator, chosen_lambda = HYBRID_ROWS[row]
        key_noise = self.args.key_noise if noisy else 0.0
        reading_lambda = self.reading_lambda(task) if chosen_lambda else None
        facts = self.facts(
            task,
            row,
            seed=seed,
            rank=rank,
            pema=asdict(self.pema_config),
            emulator_id=self.emulator_manifest["id"],
            **({"key_noise": key_noise} if noisy else {}),
            **({"reading_lambda": reading_lambda} if reading_lambda is not None else {}),
        )
        cell = self.cells.get(facts)
        if cell is None:
            adapter, config, training = self.pema(task, source, seed, rank, key_noise)
            scheduled = replace(config, schedule=schedule)
            if reading_lambda is not None:
                scheduled = replace(scheduled, lambda_max=reading_lambda)
            decoded = self.decode(
                self.full,
                task,
                lambda _first: pema_policy(adapter, self.head, scheduled, task.max_new_tokens),  # one per batch
                f"{row} seed {seed}",
                reads_emulator,
            )
            cell = self.cells.put(facts, {"seed": seed, **decoded, **training})
        return cell

    def reading_lambda(self, task: Task) -> float:
        """The reading mode's λ for `task`, as bench/pema_key_noise.py chose it on held-out examples."""
        path = Path(self.args.reading_lambda_file)
        chosen = json.loads(path.read_text()).get("reading_lambda", {}) if path.is_file() else {}
        if task.slug not in chosen:
            raise SystemExit(
                f"{path} has no reading λ for {task.slug}: run bench/pema_key_noise.py --reading-lambdas first"
            )
        return float(chosen[task.slug])

    def lora_config(self, seed: int, blocks: str) -> TrainConfig:
        return replace(self.recipe.train_config(seed), train_blocks=blocks)

    def lora_emulator(self, task: Task, seed: int, row: str = "lora_emulator_plug_in") -> dict[str, Any]:
        every_block, proxy = LORA_EMULATOR_ROWS[row]
        recipe = replace(self.recipe, train_blocks=EVERY_BLOCK) if every_block else self.recipe
        facts = self.facts(task, row, seed=seed, recipe=asdict(recipe), emulator_id=self.emulator_manifest["id"])
        cell = self.cells.get(facts)
        if cell is None:
            kind = "lora-emulator-every" if every_block else "lora-emulator"
            adapter = self.work / f"{task.slug}-{task.digest()}-{kind}-s{seed}"
            seconds = self.emulator_lora(task, self.lora_config(seed, recipe.train_blocks), adapter)
            if proxy:
                tuned = plug_into_emulator(copy.deepcopy(self.emulator), self.emulator_manifest, adapter)
                model: torch.nn.Module = ProxyTuned(self.full, tuned, self.emulator)
            else:
                model = plug(self.full, adapter, "lora")
            decoded = self.decode(model, task, lambda _first: model_policy, f"{row} seed {seed}")
            cell = self.cells.put(facts, {"seed": seed, **decoded, "train_seconds": seconds})
        return cell

    def emulator_lora(self, task: Task, config: TrainConfig, directory: Path) -> float | None:
        """LoRA trained on the emulator into `directory` (named for the task's rows), kept there: an adapter already
        there that this emulator and config trained is reused (the rows of one adapter share it). Its training
        seconds, where known."""
        seconds_file = directory.with_suffix(".seconds")
        manifest = directory / "offsite.json"
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            trained = found["training"]
            if found["emulator"] == self.emulator_manifest["id"] and all(
                trained.get(k) == v for k, v in asdict(config).items() if k in trained
            ):
                return float(seconds_file.read_text()) if seconds_file.is_file() else None
        result = train_adapter(self.emulator_dir, task.train, config, directory, show_progress=self.args.progress)
        seconds_file.write_text(f"{result.seconds:.1f}\n")
        return round(result.seconds, 1)

    def lora_full(self, task: Task, seed: int) -> dict[str, Any]:
        facts = self.facts(task, "lora_full", seed=seed, recipe=asdict(self.recipe))
        cell = self.cells.get(facts)
        if cell is None:
            say(f"{task.slug}: LoRA on every block of the full model, seed {seed}")
            model = copy.deepcopy(self.full)
            config = self.lora_config(seed, "all")
            torch.manual_seed(seed)
            peft_model = lora.attach(model, spec_for(model.config), list(range(depth(model.config))), config)
            data = tokenize_for_training(self.tokenizer, task.train, self.recipe.max_length)
            trained = fit(peft_model, data, ensure_pad_token(self.tokenizer), config, show_progress=self.args.progress)
            decoded = self.decode(peft_model, task, lambda _first: model_policy, f"LoRA full seed {seed}")
            cell = self.cells.put(
                facts,
                {"seed": seed, **decoded, "train_seconds": round(trained.seconds, 1), "last_loss": trained.last_loss},
            )
        return cell

    def run_task(self, task: Task, seeds: Sequence[int], rows: Sequence[str]) -> None:
        if "zero_shot" in rows:
            self.zero_shot(task)
        for seed in seeds:
            if any(r in rows for r in (*PEMA_ROWS, "pema_gu_oracle_length")):
                self.pema_rows(task, seed)
            for row in HYBRID_ROWS:
                if row in rows and (row != "hybrid_no_bridge" or seed == seeds[0]):
                    self.hybrid(task, seed, row)
            for row in LORA_EMULATOR_ROWS:
                if row in rows:
                    self.lora_emulator(task, seed, row)
            if "lora_full" in rows:
                self.lora_full(task, seed)


# ---- report


def build_report(cells: Cells, tasks: dict[str, Task], emulator_id: str) -> dict[str, Any]:
    """Per task × row: BLEU and chrF with CIs over seeds and inputs; paired comparisons; the issue's targets.

    Rows that depend on the emulator (hybrid, LoRA on the emulator) count only `emulator_id`'s cells; the others are
    shared by every emulator's report."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    selections: dict[str, dict[str, Any]] = {}
    for cell in cells.all():
        task = tasks.get(cell["task"])
        if task is None or cell["task_digest"] != task.digest():
            continue  # another split or another task size
        if cell.get("emulator_id", emulator_id) != emulator_id:
            continue  # another emulator's report
        if cell["row"].startswith("selection_"):
            selections.setdefault(cell["task"], {})[cell["row"].removeprefix("selection_")] = cell
        elif cell["row"] in ROWS:
            groups.setdefault((cell["task"], cell["row"]), []).append(cell)
    statistics: dict[tuple[str, str, str], np.ndarray] = {}
    runs = []
    for (slug, row), found in sorted(groups.items(), key=lambda kv: (kv[0][0], ROWS.index(kv[0][1]))):
        found = sorted(found, key=lambda c: c["seed"])
        if len({c["seed"] for c in found}) != len(found):
            raise ValueError(f"cells of {slug}/{row} repeat a seed (another configuration?): delete the stale ones")
        task = tasks[slug]
        record: dict[str, Any] = {"task": slug, "row": row, "seeds": [c["seed"] for c in found]}
        for metric in METRICS:
            matrix = np.stack([sentence_statistics(metric, c["outputs"], task.references) for c in found])
            statistics[(slug, row, metric)] = matrix
            estimate = corpus_estimate(metric, matrix)
            prefix = "" if metric == "bleu" else "chrf_"
            record |= {
                metric: round(estimate.mean, 2),
                f"{prefix}ci_low": round(estimate.ci_low, 2),
                f"{prefix}ci_high": round(estimate.ci_high, 2),
            }
        record["hit_limit_fraction"] = round(float(np.mean([c["hit_limit_fraction"] for c in found])), 4)
        record["sample"] = found[0]["outputs"][:2]
        for key in (
            "train_seconds",
            "memory_seconds",
            "decode_seconds",
            "memory_rows",
            "rank",
            "validation_ce",
            "model_validation_ce",
            "length_mae_tokens",
        ):
            values = [c[key] for c in found if c.get(key) is not None]
            if values:
                record[key] = round(float(np.mean(values)), 4)
        record["n"] = len(task.prompts)
        runs.append(record)

    def bleu(slug: str, row: str) -> float | None:
        return next((r["bleu"] for r in runs if r["task"] == slug and r["row"] == row), None)

    comparisons, targets = [], []
    for slug in tasks:
        present = {r["row"] for r in runs if r["task"] == slug}
        schedules = [r for r in PEMA_ROWS if r in present]
        best_pema = max(schedules, key=lambda r: bleu(slug, r)) if schedules else None
        pairs = [("pema_gate", s) for s in ("pema_constant", "pema_gu")] + [
            ("hybrid", "zero_shot"),
            ("hybrid_constant", "zero_shot"),
            ("hybrid_key_noise", "zero_shot"),
            ("hybrid_key_noise_constant", "zero_shot"),
            ("hybrid_key_noise", "hybrid"),
            ("hybrid_key_noise_constant", "hybrid_constant"),
            ("hybrid_reads_emulator", "zero_shot"),
            ("hybrid_reads_emulator_constant", "zero_shot"),
            ("hybrid_reads_emulator", "hybrid"),
            ("hybrid_reads_emulator_constant", "hybrid_constant"),
            ("hybrid_reads_emulator_chosen", "zero_shot"),
            ("hybrid_reads_emulator_chosen", "hybrid_reads_emulator_constant"),
            ("pema_gu", "zero_shot"),
            ("lora_emulator_plug_in", "zero_shot"),
            ("lora_emulator_proxy", "zero_shot"),
            ("lora_emulator_every_proxy", "zero_shot"),
            ("lora_emulator_proxy", "lora_emulator_plug_in"),
            ("lora_emulator_every_proxy", "lora_emulator_proxy"),
            ("lora_full", "zero_shot"),
        ]
        if best_pema:
            pairs += [(best_pema, "lora_full"), (best_pema, "lora_emulator_plug_in")]
        for a, b in pairs:
            if a in present and b in present:
                same = a in PEMA_ROWS and b in PEMA_ROWS  # one adapter per seed, two schedules
                c = corpus_compare("bleu", statistics[(slug, a, "bleu")], statistics[(slug, b, "bleu")], same)
                comparisons.append({"task": slug, "a": a, "b": b, **c.as_dict()})
        zs = bleu(slug, "zero_shot")
        for hybrid, remote, schedule in HYBRID_VERSUS_REMOTE:
            if zs is not None and hybrid in present and remote in present:
                remote_gain = bleu(slug, remote) - zs
                ratio = (bleu(slug, hybrid) - zs) / remote_gain if remote_gain > 0 else None
                targets.append(_target(slug, f"hybrid gain ≥ 80% of remote PEMA's ({schedule})", ratio, 0.8))
        if best_pema and "lora_full" in present:
            ratio = bleu(slug, best_pema) / bleu(slug, "lora_full") if bleu(slug, "lora_full") else None
            targets.append(_target(slug, f"PEMA ({best_pema}) ≥ 90% of full-model LoRA", ratio, 0.9))
        if best_pema and "lora_emulator_plug_in" in present:
            margin = bleu(slug, best_pema) - bleu(slug, "lora_emulator_plug_in")
            targets.append(
                _target(slug, f"PEMA ({best_pema}) above LoRA-on-emulator plug-in", margin, 0.0, strict=True)
            )
        if {"pema_gate", "pema_constant", "pema_gu"} <= present:
            margin = bleu(slug, "pema_gate") - max(bleu(slug, "pema_constant"), bleu(slug, "pema_gu"))
            targets.append(_target(slug, "gate ≥ the better of constant λ and GU", margin, 0.0))
        worst = max((r for r in runs if r["task"] == slug), key=lambda r: r["hit_limit_fraction"], default=None)
        zero_shot = groups.get((slug, "zero_shot"), [{}])[0]
        goal = round(0.05 + zero_shot.get("long_reference_fraction", 0.0), 4)  # "unless the reference is that long"
        what = "no row hits the token limit on more than 5% of inputs (more where references are that long)"
        if worst is not None:
            value = worst["hit_limit_fraction"]
            targets.append({**_target(slug, what, value, goal, below=True), "worst_row": worst["row"]})
    return {
        "runs": runs,
        "comparisons": comparisons,
        "targets": targets,
        "selections": {slug: {k: _strip(v) for k, v in s.items()} for slug, s in selections.items()},
        "tasks": {
            slug: {"name": t.name, "about": t.about, "max_new_tokens": t.max_new_tokens} for slug, t in tasks.items()
        },
        "bootstrap": {"samples": stats.BOOTSTRAP_SAMPLES, "confidence": stats.CONFIDENCE, "over": "inputs and seeds"},
    }


def _strip(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cell.items() if k not in ("outputs", "finish", "model", "task_digest")}


def _target(task: str, what: str, value: float | None, goal: float, below: bool = False, strict: bool = False) -> dict:
    if value is None:
        met = None
    elif below:
        met = value <= goal
    else:
        met = value > goal if strict else value >= goal
    return {"task": task, "target": what, "value": None if value is None else round(value, 3), "goal": goal, "met": met}


ROW_NAMES = {
    "zero_shot": "zero-shot (full model)",
    "pema_constant": "PEMA, constant λ",
    "pema_gu": "PEMA, Gradual Unrolling (L predicted)",
    "pema_gate": "PEMA, learned gate",
    "pema_gu_oracle_length": "PEMA, GU with the reference's length (upper bound, leaks)",
    "hybrid": "hybrid PEMA (emulator memory, bridged), GU",
    "hybrid_constant": "hybrid PEMA (emulator memory, bridged), constant λ",
    "hybrid_no_bridge": "hybrid PEMA without the bridge",
    "hybrid_key_noise": "hybrid PEMA trained with key noise, GU",
    "hybrid_key_noise_constant": "hybrid PEMA trained with key noise, constant λ",
    "hybrid_reads_emulator": "hybrid PEMA reading the emulator's states at generation, GU",
    "hybrid_reads_emulator_constant": "hybrid PEMA reading the emulator's states at generation, constant λ",
    "hybrid_reads_emulator_chosen": "hybrid PEMA reading the emulator's states, λ chosen on held-out examples",
    "lora_emulator_plug_in": "LoRA on the emulator, plugged in",
    "lora_emulator_proxy": "LoRA on the emulator, served by proxy-tuning",
    "lora_emulator_every_proxy": "LoRA on every emulator block, served by proxy-tuning",
    "lora_full": "LoRA on every block of the full model (ceiling)",
}


def markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# PEMA on {meta.get('model', 'the model')}",
        "",
        f"Greedy, the one token loop, stop on end-of-text or a newline; sacreBLEU and chrF; 95% CIs resample "
        f"seeds and test inputs ({stats.BOOTSTRAP_SAMPLES} draws). Emulator `{meta.get('emulator')}`. "
        f"PEMA: {meta.get('pema')}. LoRA recipe: {meta.get('recipe')}. {meta.get('device', '')}",
    ]
    for slug, task in report["tasks"].items():
        rows = [r for r in report["runs"] if r["task"] == slug]
        if not rows:
            continue
        selection = report["selections"].get(slug, {})
        lines += ["", f"## {task['name']}", "", f"{task['about']}; at most {task['max_new_tokens']} new tokens."]
        trained = next((r for r in rows if r["row"] == "pema_gu" and "model_validation_ce" in r), None)
        if trained:
            lines += [
                "",
                f"On the memory's held-out examples: PEMA's next-token cross-entropy {trained['validation_ce']:.3f} "
                f"against the frozen model's {trained['model_validation_ce']:.3f}; the length predictor's error "
                f"{trained['length_mae_tokens']:.1f} tokens; memory build {trained['memory_seconds']:.0f} s, PEMA "
                f"training {trained['train_seconds']:.0f} s (both phases, the gate and the length predictor).",
            ]
        if "rank" in selection:
            lines += [
                "",
                f"PEMA rank {selection['rank']['rank']}, chosen on held-out examples of the memory "
                f"(validation CE {selection['rank']['validation_ce']}).",
            ]
        lines += [
            "",
            "| row | BLEU [95% CI] | chrF [95% CI] | hit the limit | seeds | train s | first output |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]

        def seconds(r: dict[str, Any]) -> str:
            return f"{r['train_seconds']:.0f}" if "train_seconds" in r else "—"

        for r in rows:
            lines.append(
                f"| {ROW_NAMES[r['row']]} | {r['bleu']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                f"| {r['chrf']:.2f} [{r['chrf_ci_low']:.2f}, {r['chrf_ci_high']:.2f}] "
                f"| {100 * r['hit_limit_fraction']:.1f}% | {len(r['seeds'])} | {seconds(r)} "
                f"| {r['sample'][0][:80]!r} |"
            )
        compared = [c for c in report["comparisons"] if c["task"] == slug]
        if compared:
            lines += ["", "| paired (same inputs) | BLEU difference [95% CI] | p |", "|---|---:|---:|"]
            lines += [
                f"| {c['a']} − {c['b']} | {c['difference_mean']:+.2f} [{c['difference_ci_low']:+.2f}, "
                f"{c['difference_ci_high']:+.2f}] | {c['p_value']:.3f} |"
                for c in compared
            ]
    bridge = meta.get("bridge")
    if bridge:
        card = bridge["card"]
        lines += [
            "",
            "## The owner's bridge (hybrid PEMA)",
            "",
            f"An affine map of the emulator's final states to the full model's, ridge α {bridge['ridge_alpha']}, "
            f"fitted on {bridge['fit_rows']:,} positions of public text in {bridge['seconds']:.0f} s "
            f"({bridge['excluded']} excluded); measured on {card['positions']:,} positions of a held-out novel.",
            "",
            "| on held-out public text | emulator | emulator + bridge | full model |",
            "|---|---:|---:|---:|",
            f"| median cosine to the full model's state | {card['cosine_before']:.3f} "
            f"| {card['cosine_after']:.3f} | 1 |",
            f"| NMSE to the full model's state | {card['nmse_before']:.3f} | {card['nmse_after']:.3f} | 0 |",
            f"| top-1 agreement with the full model (what it reveals) | {card['top1_emulator']:.3f} "
            f"| {card['top1_bridged']:.3f} | 1 |",
            f"| perplexity through the owner's head | {card['perplexity_emulator']:.1f} "
            f"| {card['perplexity_bridged']:.1f} | {card['perplexity_full']:.1f} |",
        ]
    lines += ["", "## Targets", "", "| task | target | value | goal | met |", "|---|---|---:|---:|---|"]
    for t in report["targets"]:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = f"{t['value']} ({t['worst_row']})" if "worst_row" in t else t["value"]
        lines.append(f"| {t['task']} | {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [s for s in report["tasks"] if any(r["task"] == s for r in report["runs"])]
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4), squeeze=False)
    for axis, slug in zip(axes[0], tasks, strict=False):
        rows = [r for r in report["runs"] if r["task"] == slug]
        x = np.arange(len(rows))
        means = np.array([r["bleu"] for r in rows])
        errors = np.array([[r["bleu"] - r["ci_low"], r["ci_high"] - r["bleu"]] for r in rows]).T
        axis.bar(x, means, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_xticks(x, [r["row"] for r in rows], rotation=35, ha="right", fontsize=8)
        axis.set_title(report["tasks"][slug]["name"])
        axis.set_ylabel("BLEU (95% CI)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--store", default=str(ROOT / "runs" / "transfer" / "owner-store"), help="caches emulators")
    parser.add_argument("--emulator", default=DEFAULT_EMULATOR, help="emulator spec (built once in the store)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "pema"), help="memories and adapters")
    parser.add_argument("--cells", default=str(CELLS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=1000, help="training examples of each task")
    parser.add_argument("--test", type=int, default=300, help="test inputs of each task (a fixed random subset)")
    parser.add_argument("--max-new-tokens", type=int, help="override every task's limit (E2E 64, Multi30k 48)")
    parser.add_argument("--batch", type=int, default=32, help="prompts decoded at once")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pema-epochs", type=int, default=5)
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--lambda-max", type=float, default=PemaConfig.lambda_max)
    parser.add_argument(
        "--key-noise", type=float, default=HYBRID_KEY_NOISE, help="the key-noise rows' scale of the bridge's residual"
    )
    parser.add_argument("--reading-lambda-file", default=str(READING_LAMBDA_FILE), help="per-task λ of the reading row")
    parser.add_argument("--lora-epochs", type=float, default=2.0)
    parser.add_argument("--report", action="store_true", help="only rebuild the results from the cells")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on a few rows, in seconds")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r]
    return args


def load_tasks(args: argparse.Namespace, names: Sequence[str] | None = None) -> dict[str, Task]:
    """The tasks named (default: `--tasks`), at the run's sizes."""
    makers = {
        "e2e": lambda: data_to_text_task(args.train, args.test, args.max_new_tokens or 64),
        "multi30k_en_de": lambda: translation_task(args.train, args.test, args.max_new_tokens or 48),
    }
    chosen = list(names) if names is not None else [t for t in args.tasks.split(",") if t]
    unknown = [t for t in chosen if t not in makers]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    return {t: makers[t]() for t in chosen}


def smoke_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """A tiny model and a few rows: every code path, none of the cost."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="offsite-pema-smoke-"))
    args.model = str(save_tiny_model("llama", work / "model"))
    args.store, args.workdir, args.cells, args.out = (str(work / n) for n in ("store", "work", "cells", "pema"))
    args.emulator, args.seeds, args.ranks = "uniform:1-2-1", "0,1", [4, 8]
    args.train, args.test, args.max_new_tokens, args.batch = 24, 6, 8, 4
    args.pema_epochs, args.lora_epochs, args.progress = 2, 1.0, False
    args.reading_lambda_file = str(work / "reading_lambda.json")  # the real file is chosen on SmolLM2's examples
    Path(args.reading_lambda_file).write_text(json.dumps({"reading_lambda": {"e2e": 0.5, "multi30k_en_de": 0.5}}))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args = smoke_arguments(args)
    with one_thread_if(args.smoke):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    tasks = load_tasks(args)
    emulator_id = EmulatorSpec.parse(args.emulator).id
    meta: dict[str, Any] = {"emulator": emulator_id}
    if not args.report:
        bench = PemaBench(args)
        rows = [r for r in args.rows.split(",") if r]
        for task in tasks.values():
            bench.run_task(task, [int(s) for s in args.seeds.split(",") if s], rows)
        meta |= {
            "device": f"CPU ({platform.machine()}), torch threads {torch.get_num_threads()}",
            "model": bench.model_name,
            "pema": asdict(bench.pema_config),
            "recipe": asdict(bench.recipe),
        }
        if any(r.startswith("hybrid") for r in rows):
            meta["bridge"] = bench.bridge()[1]
    out = Path(args.out)
    previous = out.with_suffix(".json")
    earlier = json.loads(previous.read_text()).get("meta", {}) if previous.is_file() else {}
    if earlier.get("emulator") == emulator_id:  # what the runs that made the cells knew: device, model, bridge
        meta = {**earlier, **meta}
    # every task's cells, not only those run now: a run of one task must not drop another's table
    found = {**load_tasks(args, [t for t in TASKS if t not in tasks]), **tasks}
    every_task = {t: found[t] for t in TASKS}  # in TASKS's order, whichever tasks this run named
    report = build_report(Cells(Path(args.cells)), every_task, emulator_id)
    report["meta"] = {**meta, "seconds_this_run": round(time.perf_counter() - started, 1)}
    report["out"] = str(out)
    write_results(out, report, markdown(report, report["meta"]))
    plot(report, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
