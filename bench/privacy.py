"""What leaves each side, measured: membership inference on pushed adapters (with and without DP), and how fast a
tenant with Represent closes the emulator's privacy gap.

Two parts, each cached cell by cell under `--cells` (one JSON file per cell, named by a hash of everything its
numbers depend on), so a long run stops and resumes; `--report` only reads the cells.

- `dp`: LoRA adapters trained on the emulator (the transfer recipe, but `--epochs` passes over `--members` SST-2
  training rows, so that the no-DP adapter can memorise), once without DP and once per `--epsilons` ε, each with
  every `--seeds` seed. The owner's attack: plug the adapter into the full model and score each row's completion
  loss. Members are the training rows, non-members as many held-out training-split rows never trained on. Two
  scores: the loss itself (Yeom et al. 2018), and the loss minus the base model's loss on the same row (a
  reference-calibrated attack, "LiRA-lite" with the owner's own base model as the one reference). Reported: ROC AUC
  with a bootstrap 95% CI (seeds, members and non-members resampled), and the plug-in accuracy on the first
  `--dev-rows` rows of SST-2 dev, with its cost against no DP.
- `extraction`: the tenant holds the emulator bundle (the full model's exact bottom and top blocks) and calls
  Represent, which returns the full model's last-block states and its top-k log-probs (the owner's default policy).
  Simulated in process with the owner's own `RepresentationBatcher` and the servicer's top-k, it fine-tunes the
  emulator's compressed middle on public text to match them (NMSE on the states, KL on the top-k buckets, plus LM),
  for each `--budgets` token budget (positions returned, what `represent_token_budget` counts). After each, the
  owner's report card: the privacy gap is its held-out perplexity ratio minus one (emulator / full on WikiText-2
  valid's tail, the figure `serve --release-margin` compares), 0 when the emulator predicts as well as the model.

    python bench/privacy.py                       # both parts on SmolLM2 and distill:2-8-2 (resumable)
    python bench/privacy.py --part dp --seeds 0   # one part, one seed
    python bench/privacy.py --report              # tables and plot from the cells
    python bench/privacy.py --smoke               # tiny model, seconds (the test suite runs it)

writes bench/results/privacy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offsite.client.training import train_adapter
from offsite.client.training.config import DEFAULT_DP_DELTA, DEFAULT_DP_MAX_GRAD_NORM
from offsite.common import confidence as stats
from offsite.common.architectures import blocks
from offsite.common.contract import DEFAULT_EMULATOR, DEFAULT_MODEL
from offsite.common.emulator_loading import load_emulator
from offsite.common.scoring import ExampleScore, score_examples
from offsite.owner.adapters.plugin import plug
from offsite.owner.config import DEFAULT_REPRESENT_TOP_K
from offsite.owner.emulator.distill import DistillConfig, batch_order, cosine_lr, middle_parameters, nmse
from offsite.owner.emulator.public_text import GUTENBERG_TEXT, read_public_text, token_chunks
from offsite.owner.emulator.report_card import measure
from offsite.owner.representations import ALL_LOG_PROBS, RepresentationBatcher

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import Cells  # noqa: E402
from results_files import write_results  # noqa: E402
from threads import one_thread_if  # noqa: E402
from transfer import RECIPE_FILE, Recipe, TransferBench, build_recipe, load_recipe  # noqa: E402
from transfer_tasks import SHARED, TASKS, Item, TaskData  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "privacy"
CELLS = ROOT / "bench" / "results" / "privacy_cells"
STORE = ROOT / "runs" / "transfer" / "owner-store"  # the transfer bench's store: its emulator is reused, not rebuilt
BENCH = "privacy"  # every cell says which benchmark wrote it

DP_TASK = "sst2"
MEMBERS = 256  # a few hundred rows: few enough that several epochs memorise them
EPOCHS = 8.0  # the same budget for every setting, DP or not
DEV_ROWS = 500  # the first rows of SST-2 dev, as the transfer bench scores
EPSILONS = "none,8,3,1"
# the target at the default setting, by whether its AUC's CI stays under AUC_TARGET
DEFAULT_VERDICT = {True: "met, the whole CI under it.", False: "not met.", None: "not measured."}
AUC_TARGET = 0.55  # issue 16: the membership-inference AUC a DP adapter should stay under

# WikiText-2 test: public text the owner's builders never read; the report card scores WikiText-2 valid's tail
ATTACK_TEXT = SHARED / "wikitext2_valid_test" / "test.txt"
BUDGETS = "0,10000,50000,200000"
ATTACK_TEXT_CHARS = 2_000_000  # all of WikiText-2 test; a fixed cap, so the windows do not depend on the budgets
KD_WEIGHT = 1.0
LM_WEIGHT = 1.0  # the attacker has the text, so the plain LM loss comes free
KL_FLOOR = 1e-8  # keeps the rest bucket's log finite when the top-k hold all the mass


def say(text: str) -> None:
    print(f"[privacy] {text}", file=sys.stderr, flush=True)


# ---- statistics


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(a member scores above a non-member), ties counting half: the Mann-Whitney U over both counts."""
    members, nonmembers = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    if not members.size or not nonmembers.size:
        raise ValueError("the AUC needs at least one member and one non-member")
    _, inverse, counts = np.unique(np.concatenate([members, nonmembers]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based, tied values share their average rank
    u = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * nonmembers.size))


def auc_estimate(members: np.ndarray, nonmembers: np.ndarray) -> stats.Estimate:
    """Mean AUC over seeds (rows of two seeds × rows matrices) and a bootstrap CI over seeds, members and non-members.

    The same resampled rows serve every seed of a draw: the member set is one set, trained on with several seeds.
    """
    members, nonmembers = np.atleast_2d(members), np.atleast_2d(nonmembers)
    seeds = members.shape[0]
    rng = np.random.default_rng(stats.BOOTSTRAP_SEED)
    samples = np.empty(stats.BOOTSTRAP_SAMPLES)
    for draw in range(stats.BOOTSTRAP_SAMPLES):
        chosen = rng.integers(0, seeds, size=seeds)
        m = rng.integers(0, members.shape[1], size=members.shape[1])
        n = rng.integers(0, nonmembers.shape[1], size=nonmembers.shape[1])
        samples[draw] = np.mean([roc_auc(members[s, m], nonmembers[s, n]) for s in chosen])
    tail = (1 - stats.CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    observed = float(np.mean([roc_auc(members[s], nonmembers[s]) for s in range(seeds)]))
    return stats.Estimate(observed, float(low), float(high))


# ---- plans: everything a cell's numbers depend on that is known before the model is loaded


def epsilon_label(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"{epsilon:g}"


def parse_epsilons(text: str) -> list[float | None]:
    values = [None if t.strip().lower() in ("none", "null", "inf") else float(t) for t in text.split(",") if t]
    if any(v is not None and not v > 0 for v in values):
        raise SystemExit("--epsilons: each ε must be positive, or none for no DP")
    return values


@dataclass(frozen=True)
class DpPlan:
    task: str
    members: int
    dev_rows: int
    epochs: float
    recipe: Recipe  # the transfer recipe; its train_rows is replaced by `members`
    delta: float = DEFAULT_DP_DELTA
    max_grad_norm: float = DEFAULT_DP_MAX_GRAD_NORM

    def facts(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "dev_rows": self.dev_rows,
            "epochs": self.epochs,
            "recipe": {**asdict(self.recipe), "train_rows": self.members},
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
        }


@dataclass(frozen=True)
class AttackPlan:
    """The tenant's distillation against Represent: DistillConfig's batch, window, learning rate and NMSE weight."""

    batch_size: int = DistillConfig.batch_size
    seq_len: int = DistillConfig.seq_len
    lr: float = DistillConfig.lr
    warmup_steps: int = DistillConfig.warmup_steps
    nmse_weight: float = DistillConfig.nmse_weight
    kd_weight: float = KD_WEIGHT
    lm_weight: float = LM_WEIGHT
    top_k: int = DEFAULT_REPRESENT_TOP_K  # what the owner's default policy lets a tenant see
    text_chars: int = ATTACK_TEXT_CHARS  # the first characters of the public text that are cut into windows

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def steps(self, budget: int) -> int:
        return math.ceil(budget / self.tokens_per_step)

    def schedule(self, budget: int, seed: int) -> DistillConfig:
        """The owner's warm-up and cosine schedule, over this budget's steps (short runs warm up for a tenth)."""
        steps = self.steps(budget)
        warmup = min(self.warmup_steps, max(1, steps // 10))
        return DistillConfig(
            steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr, warmup_steps=warmup, seed=seed
        )


def dp_selector(args: argparse.Namespace, plan: DpPlan, data: TaskData, epsilon: float | None, seed: int) -> dict:
    return {
        "task": data.name,
        "row": f"mia_eps_{epsilon_label(epsilon)}",
        "bench": BENCH,
        "model_name": args.model,
        "emulator": args.emulator,
        "rows_digest": data.digest(),
        **plan.facts(),
        "epsilon": epsilon,
        "seed": seed,
    }


def base_selector(args: argparse.Namespace, plan: DpPlan, data: TaskData) -> dict:
    return {
        "task": data.name,
        "row": "mia_base",
        "bench": BENCH,
        "model_name": args.model,
        "rows_digest": data.digest(),
        "members": plan.members,
        "dev_rows": plan.dev_rows,
        "max_length": plan.recipe.max_length,
    }


def extraction_selector(args: argparse.Namespace, attack: AttackPlan, text_sha256: str, budget: int, seed: int) -> dict:
    return {
        "task": "extraction",
        "row": f"tokens_{budget}",
        "bench": BENCH,
        "model_name": args.model,
        "emulator": args.emulator,
        "attack": asdict(attack),
        "attack_text_sha256": text_sha256,
        "tokens": budget,
        "seed": None if budget == 0 else seed,  # no training at 0 tokens: one cell serves every seed
    }


def find(cells: Cells, selector: dict[str, Any]) -> dict[str, Any] | None:
    """The one cell matching `selector`; two (another build of the model or emulator) are refused, never pooled.

    A selector holds what is known before the model loads; a cell adds what only the loaded model and emulator give
    (fingerprint, emulator id and parameters, prompt format), so `--report` needs neither.
    """
    found = [c for c in cells.all() if all(c.get(k) == v for k, v in selector.items())]
    if len(found) > 1:
        raise ValueError(f"{len(found)} cells match {selector['task']}/{selector['row']}; delete the stale ones")
    return found[0] if found else None


# ---- the measurements


def completion_nll(scores: list[ExampleScore]) -> list[float]:
    """Each row's mean NLL per token of its gold completion: the loss the adapter was trained on, less the EOS."""
    return [round(-s.logprobs[s.gold] / s.tokens[s.gold], 6) for s in scores if s.gold is not None]


def bits(scores: list[ExampleScore]) -> str:
    return "".join("1" if s.correct else "0" for s in scores)


class PrivacyBench:
    def __init__(self, args: argparse.Namespace, recipe: Recipe):
        self.args = args
        self.cells = Cells(Path(args.cells))
        # the transfer bench loads the model, builds or reuses the emulator in the store, and picks the prompt format
        transfer_args = argparse.Namespace(
            model=args.model, store=args.store, cells=args.cells, progress=args.progress, test_limit=args.dev_rows
        )
        self.transfer = TransferBench(transfer_args, recipe)
        self.full = self.transfer.loaded.model
        self.tokenizer = self.transfer.tokenizer

    def derived(self, data: TaskData | None, with_emulator: bool) -> dict[str, Any]:
        facts: dict[str, Any] = {"model": self.transfer.fingerprint[:16]}
        if data is not None:
            facts["format"] = self.transfer.prompt_format(data)
        if with_emulator:
            _, manifest = self.transfer.emulator(self.args.emulator)
            # keyed by the build's recipe, not its outcome: a CPU rebuild is not bit-identical (as in transfer.py)
            facts.update(emulator_id=manifest["id"], emulator_params=build_recipe(manifest["params"]))
        return facts

    def score(self, model: torch.nn.Module, items: list[Item], fmt: str) -> list[ExampleScore]:
        examples = self.transfer.examples(items, fmt)
        return score_examples(model, self.tokenizer, examples, max_length=self.transfer.recipe.max_length)

    def mia_scores(self, model: torch.nn.Module, rows: dict[str, list[Item]], fmt: str) -> dict[str, Any]:
        started = time.perf_counter()
        members, nonmembers, dev = (self.score(model, rows[k], fmt) for k in ("members", "nonmembers", "dev"))
        return {
            "member_nll": completion_nll(members),
            "nonmember_nll": completion_nll(nonmembers),
            "member_accuracy": float(np.mean([s.correct for s in members])),
            "nonmember_accuracy": float(np.mean([s.correct for s in nonmembers])),
            "acc_bits": bits(dev),
            "acc": float(np.mean([s.correct for s in dev])),
            "eval_seconds": round(time.perf_counter() - started, 1),
        }

    def base(self, plan: DpPlan, data: TaskData, rows: dict[str, list[Item]]) -> dict[str, Any]:
        facts = {**base_selector(self.args, plan, data), **self.derived(data, with_emulator=False)}
        cell = self.cells.get(facts)
        if cell is None:
            say("base model: losses of members and non-members, dev accuracy")
            cell = self.cells.put(facts, self.mia_scores(self.full, rows, facts["format"]))
        return cell

    def dp_cell(
        self, plan: DpPlan, data: TaskData, rows: dict[str, list[Item]], epsilon: float | None, seed: int
    ) -> dict[str, Any]:
        facts = {**dp_selector(self.args, plan, data, epsilon, seed), **self.derived(data, with_emulator=True)}
        cell = self.cells.get(facts)
        if cell is not None:
            return cell
        directory, _ = self.transfer.emulator(self.args.emulator)
        say(f"adapter on {self.args.emulator}, ε {epsilon_label(epsilon)}, seed {seed}")
        config = replace(
            plan.recipe.train_config(seed),
            epochs=plan.epochs,
            dp_epsilon=epsilon,
            dp_delta=plan.delta,
            dp_max_grad_norm=plan.max_grad_norm,
        )
        adapter = self.transfer.scratch / f"mia-{epsilon_label(epsilon)}-{seed}"
        trained = train_adapter(
            directory,
            self.transfer.examples(rows["members"], facts["format"]),
            config,
            adapter,
            show_progress=self.args.progress,
        )
        plugged = plug(self.full, adapter, "lora")
        result = self.mia_scores(plugged, rows, facts["format"])
        result.update(
            train_seconds=round(trained.seconds, 1),
            steps=trained.steps,
            first_loss=trained.first_loss,
            last_loss=trained.last_loss,
            privacy=trained.privacy,
        )
        return self.cells.put(facts, result)

    # ---- extraction

    def represent(self, batcher: RepresentationBatcher, windows: torch.Tensor, top_k: int) -> tuple[torch.Tensor, ...]:
        """What Represent returns for each window: the owner's batcher folds them into one forward, then the
        servicer's top-k (owner/servicer.py `encode_representation`)."""
        with ExitStack() as stack:
            requests = [stack.enter_context(batcher.pending(w.tolist(), ALL_LOG_PROBS)) for w in windows]
            results = [batcher.run(r) for r in requests]
        states = torch.stack([r.hidden for r in results])
        values, indices = torch.stack([r.log_probs for r in results]).topk(top_k, dim=-1)
        return states, values, indices

    def attack(self, attack: AttackPlan, windows: torch.Tensor, budget: int, seed: int) -> dict[str, Any]:
        """Fine-tunes a fresh copy of the emulator's middle against Represent for `budget` tokens; the report card."""
        directory, manifest = self.transfer.emulator(self.args.emulator)
        emulator, _, _ = load_emulator(directory)
        schedule = attack.schedule(budget, seed)
        started = time.perf_counter()
        losses: list[float] = []
        if schedule.steps:
            torch.manual_seed(seed)
            params = middle_parameters(emulator, manifest["block_map"], manifest["adapter_blocks"]["full"])
            for parameter in emulator.parameters():
                parameter.requires_grad_(False)
            for parameter in params.values():
                parameter.requires_grad_(True)
            optimizer = torch.optim.AdamW(list(params.values()), lr=attack.lr, weight_decay=0.0)
            batcher = RepresentationBatcher(self.full, batch=attack.batch_size)
            captured: list[torch.Tensor] = []
            handle = blocks(emulator)[-1].register_forward_hook(  # the student's pre-norm state, as Represent's
                lambda _m, _a, output: captured.append(output[0] if isinstance(output, tuple) else output)
            )
            emulator.train()
            try:
                for step in range(schedule.steps):
                    batch = windows[batch_order(len(windows), attack.batch_size, seed, step)]
                    states, top_values, top_ids = self.represent(batcher, batch, attack.top_k)
                    captured.clear()
                    out = emulator(input_ids=batch, labels=batch)
                    loss = (
                        attack.lm_weight * out.loss
                        + attack.nmse_weight * nmse(states, captured[-1])
                        + attack.kd_weight * top_k_kl(top_values, top_ids, out.logits)
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(schedule, step)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
            finally:
                handle.remove()
            emulator.eval()
        trained_seconds = time.perf_counter() - started
        card = measure(self.full, emulator, self.tokenizer)
        return {
            "tokens_spent": schedule.steps * attack.tokens_per_step,
            "steps": schedule.steps,
            "privacy_gap": round(card.perplexity_ratio - 1, 4),
            "report_card": card.as_dict(),
            "gutenberg_ratio": round(card.gutenberg_perplexity / card.full_gutenberg_perplexity, 4),
            "first_loss": float(np.mean(losses[:10])) if losses else None,
            "last_loss": float(np.mean(losses[-10:])) if losses else None,
            "train_seconds": round(trained_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }

    def extraction_cell(
        self, attack: AttackPlan, windows: torch.Tensor, text_sha256: str, budget: int, seed: int
    ) -> dict[str, Any]:
        facts = {
            **extraction_selector(self.args, attack, text_sha256, budget, seed),
            **self.derived(None, with_emulator=True),
        }
        cell = self.cells.get(facts)
        if cell is None:
            say(f"extraction: {budget} Represent tokens, seed {facts['seed']}")
            cell = self.cells.put(facts, self.attack(attack, windows, budget, seed))
        return cell


def top_k_kl(top_values: torch.Tensor, top_ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over k + 1 buckets, the top-k tokens and the rest: exact for what top-k reveals."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    picked = student.gather(-1, top_ids)
    teacher_rest = (1 - top_values.exp().sum(-1)).clamp_min(KL_FLOOR)
    student_rest = (1 - picked.exp().sum(-1)).clamp_min(KL_FLOOR)
    kl = (top_values.exp() * (top_values - picked)).sum(-1) + teacher_rest * (teacher_rest.log() - student_rest.log())
    return kl.mean()


def attack_windows(tokenizer: Any, path: Path, attack: AttackPlan) -> tuple[torch.Tensor, str]:
    """Windows of the attacker's public text; a budget larger than the text goes over it again, reshuffled."""
    text, sha256 = read_public_text(path)
    return token_chunks(tokenizer, text[: attack.text_chars], attack.seq_len), sha256


# ---- the report, from cells only


def dp_rows(
    args: argparse.Namespace, cells: Cells, plan: DpPlan, data: TaskData, epsilons: list[float | None], seeds: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    base = find(cells, base_selector(args, plan, data))
    if base is None:
        return [], None
    base_members, base_nonmembers = np.array(base["member_nll"]), np.array(base["nonmember_nll"])
    matrices: dict[float | None, np.ndarray] = {}
    rows = []
    for epsilon in epsilons:
        found = [c for s in seeds if (c := find(cells, dp_selector(args, plan, data, epsilon, s))) is not None]
        if not found:
            continue
        members = np.array([c["member_nll"] for c in found])
        nonmembers = np.array([c["nonmember_nll"] for c in found])
        matrices[epsilon] = np.array([[int(b) for b in c["acc_bits"]] for c in found])
        # a lower loss says member: the scores are negated losses, raw and against the base model's
        calibrated = auc_estimate(-(members - base_members), -(nonmembers - base_nonmembers))
        raw = auc_estimate(-members, -nonmembers)
        accuracy = stats.estimate(matrices[epsilon])
        spent = [c["privacy"]["epsilon"] for c in found if c.get("privacy")]
        rows.append(
            {
                "epsilon": epsilon,
                "default": epsilon is None,  # `offsite train` has no default ε: DP is off unless --dp-epsilon
                "mia_auc": calibrated.mean,
                "mia_auc_ci": [calibrated.ci_low, calibrated.ci_high],
                "mia_auc_loss": raw.mean,
                "mia_auc_loss_ci": [raw.ci_low, raw.ci_high],
                "accuracy": accuracy.mean,
                "accuracy_ci": [accuracy.ci_low, accuracy.ci_high],
                "member_accuracy": float(np.mean([c["member_accuracy"] for c in found])),
                "nonmember_accuracy": float(np.mean([c["nonmember_accuracy"] for c in found])),
                "epsilon_spent": spent,
                "noise_multiplier": [c["privacy"]["noise_multiplier"] for c in found if c.get("privacy")],
                "seeds": [c["seed"] for c in found],
                "train_seconds": float(np.mean([c["train_seconds"] for c in found])),
                "last_loss": float(np.mean([c["last_loss"] for c in found])),
                "emulator_id": found[0]["emulator_id"],
                "format": found[0]["format"],
            }
        )
    if None in matrices:
        for row in rows:
            if row["epsilon"] is not None:
                cost = stats.compare(matrices[row["epsilon"]], matrices[None])  # DP − no DP: negative is a cost
                row["accuracy_cost"] = cost.as_dict()
    raw_base = auc_estimate(-base_members, -base_nonmembers)  # no adapter: the members are just random rows
    reference = {
        "accuracy": float(np.mean([int(b) for b in base["acc_bits"]])),
        "mia_auc_loss": raw_base.mean,
        "mia_auc_loss_ci": [raw_base.ci_low, raw_base.ci_high],
        "format": base["format"],
    }
    return rows, reference


def extraction_rows(
    args: argparse.Namespace, cells: Cells, attack: AttackPlan, text_sha256: str, budgets: list[int], seeds: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for budget in sorted(budgets):
        found = [c for s in seeds if (c := find(cells, extraction_selector(args, attack, text_sha256, budget, s)))]
        found = list({json.dumps(c, sort_keys=True): c for c in found}.values())  # budget 0: one cell for all seeds
        if not found:
            continue
        gaps = [c["privacy_gap"] for c in found]
        rows.append(
            {
                "tokens": budget,
                "tokens_spent": found[0]["tokens_spent"],
                "privacy_gap": float(np.mean(gaps)),
                "privacy_gap_seeds": gaps,
                "privacy_gap_range": [min(gaps), max(gaps)],
                "perplexity_ratio": float(np.mean([c["report_card"]["perplexity_ratio"] for c in found])),
                "emulator_perplexity": float(np.mean([c["report_card"]["perplexity"] for c in found])),
                "full_perplexity": found[0]["report_card"]["full_perplexity"],
                "gutenberg_ratio": float(np.mean([c["gutenberg_ratio"] for c in found])),
                "seeds": [c["seed"] for c in found],
                "seconds": float(np.mean([c["seconds"] for c in found])),
                "emulator_id": found[0]["emulator_id"],
            }
        )
    return rows


def _ci(mean: float, ci: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{mean * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    setup = report["dp_setup"]
    lines = [
        f"# Privacy on {report['model']}: emulator {report['emulator']}",
        "",
        "## Membership inference on adapters, with and without DP",
        "",
        f"LoRA adapters trained on the emulator ({setup['recipe_summary']}) over {setup['members']} SST-2 training "
        f"rows for {setup['epochs']:g} epochs, every setting the same budget; DP-SGD with δ = {setup['delta']:g} and "
        f"C = {setup['max_grad_norm']:g} (the `offsite train` defaults). The owner plugs each adapter into the full "
        f"model and scores the completion loss of the {setup['members']} members and {setup['members']} held-out "
        "training-split rows never trained on. AUC: reference-calibrated (loss minus the base model's loss on the "
        "same row) and loss alone; accuracy on the first "
        f"{setup['dev_rows']} SST-2 dev rows, in points. Mean over seeds [95% bootstrap CI over seeds and rows]. "
        "`offsite train` has no default ε (DP is off unless `--dp-epsilon` is given): the no-DP row is the default.",
        "",
        "| ε (spent) | MIA AUC, calibrated | MIA AUC, loss | plug-in accuracy | accuracy cost vs no DP (p) "
        "| member / non-member accuracy | seeds |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["dp"]:
        label = "none (default)" if row["epsilon"] is None else f"{row['epsilon']:g}"
        if row["epsilon_spent"]:
            label += f" ({np.mean(row['epsilon_spent']):.2f})"
        cost = row.get("accuracy_cost")
        cost_text = (
            "—"
            if cost is None
            else f"{cost['difference_mean'] * 100:+.1f} [{cost['difference_ci_low'] * 100:+.1f}, "
            f"{cost['difference_ci_high'] * 100:+.1f}] ({cost['p_value']:.3f})"
        )
        lines.append(
            f"| {label} | {_ci(row['mia_auc'], row['mia_auc_ci'])} "
            f"| {_ci(row['mia_auc_loss'], row['mia_auc_loss_ci'])} "
            f"| {_ci(row['accuracy'], row['accuracy_ci'], 100, 1)} | {cost_text} "
            f"| {row['member_accuracy'] * 100:.1f} / {row['nonmember_accuracy'] * 100:.1f} "
            f"| {','.join(map(str, row['seeds']))} |"
        )
    reference = report.get("dp_reference")
    if reference:
        lines.append(
            f"| full model, no adapter | — | {_ci(reference['mia_auc_loss'], reference['mia_auc_loss_ci'])} "
            f"| {reference['accuracy'] * 100:.1f} | — | — | — |"
        )
    target = report.get("dp_target")
    if target:

        def listed(values: list[float]) -> str:
            return ", ".join(f"{v:g}" for v in values) or "none"

        lines += [
            "",
            f"Target (issue 16): MIA AUC ≤ {AUC_TARGET}. Met on the mean at ε = {listed(target['met_mean'])}; "
            f"with the whole CI under it at ε = {listed(target['met_ci'])}. At the default setting (no DP): "
            + DEFAULT_VERDICT[target.get("default_met")],
        ]
    attack = report["extraction_setup"]
    lines += [
        "",
        "## Extraction: the emulator's privacy gap against Represent tokens",
        "",
        f"The tenant fine-tunes the emulator's compressed middle (its exact top and bottom blocks frozen) to match "
        "what Represent returns under the default policy, the full model's last-block states and "
        f"top-{attack['top_k']} log-probs, on {attack['text']}: loss = {attack['lm_weight']:g}·LM + "
        f"{attack['nmse_weight']:g}·NMSE(states) + {attack['kd_weight']:g}·KL(top-k buckets), AdamW lr "
        f"{attack['lr']:g}, warm-up then cosine, "
        f"{attack['batch_size']} × {attack['seq_len']} tokens a step; each budget is a fresh run from the shipped "
        "emulator. Privacy gap = the report card's perplexity ratio (emulator / full, WikiText-2 valid's last "
        "windows) − 1: 0 means the emulator predicts as well as the full model; `serve --release-margin M` refuses "
        "an emulator whose gap is under M. Mean over seeds [min, max].",
        "",
        "| Represent tokens | spent | privacy gap | emulator / full perplexity | Gutenberg held-out ratio | s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["extraction"]:
        low, high = row["privacy_gap_range"]
        lines.append(
            f"| {row['tokens']:,} | {row['tokens_spent']:,} | {row['privacy_gap']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {row['emulator_perplexity']:.1f} / {row['full_perplexity']:.1f} | {row['gutenberg_ratio']:.3f} "
            f"| {row['seconds']:.0f} |"
        )
    lines += ["", report["device"], ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = report["dp"]
    if rows:
        xs = np.arange(len(rows))
        labels = ["no DP" if r["epsilon"] is None else f"ε={r['epsilon']:g}" for r in rows]
        auc = np.array([r["mia_auc"] for r in rows])
        auc_err = np.array([[r["mia_auc"] - r["mia_auc_ci"][0], r["mia_auc_ci"][1] - r["mia_auc"]] for r in rows]).T
        left.errorbar(xs, auc, yerr=auc_err, fmt="o-", capsize=3, color="tab:red", label="MIA AUC (calibrated)")
        left.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        left.axhline(AUC_TARGET, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {AUC_TARGET}")
        left.set_xticks(xs, labels)
        left.set_ylabel("membership-inference ROC AUC, 95% CI")
        twin = left.twinx()
        acc = np.array([r["accuracy"] * 100 for r in rows])
        acc_err = np.array(
            [[(r["accuracy"] - r["accuracy_ci"][0]) * 100, (r["accuracy_ci"][1] - r["accuracy"]) * 100] for r in rows]
        ).T
        twin.errorbar(xs + 0.05, acc, yerr=acc_err, fmt="s--", capsize=3, color="tab:blue", label="plug-in accuracy")
        twin.set_ylabel("SST-2 dev accuracy (%)", color="tab:blue")
        handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        left.legend(handles=handles, fontsize=7, loc="upper right")
    left.set_title("Adapters: membership inference against DP", fontsize=10)
    extraction = report["extraction"]
    if extraction:
        tokens = [r["tokens"] for r in extraction]
        right.plot(tokens, [r["privacy_gap"] for r in extraction], "o-", label="mean")
        for r in extraction:
            right.scatter([r["tokens"]] * len(r["privacy_gap_seeds"]), r["privacy_gap_seeds"], s=8, color="grey")
        right.set_xscale("symlog", linthresh=max(1, min([t for t in tokens if t] or [1])))
        right.axhline(0, color="black", linewidth=0.5)
        right.set_xlabel("Represent tokens spent by the tenant")
        right.set_ylabel("privacy gap: perplexity ratio − 1")
        right.legend(fontsize=7)
    right.set_title("Emulator: distillation against Represent", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["dp", "extraction", "all"], default="all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", action="store_true", help="only aggregate the cells into --out")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the sample SST-2 rows, seconds")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--emulator", default=DEFAULT_EMULATOR, help="METHOD:L-N-R, built in (or reused from) --store")
    parser.add_argument("--store", default=str(STORE), help="owner store: caches the model and the emulator")
    parser.add_argument("--cells", default=str(CELLS), help="directory of cached cells")
    parser.add_argument("--out", default=str(RESULTS), help="results path without extension")
    parser.add_argument("--recipe", default=str(RECIPE_FILE), help="the transfer recipe the adapters train with")
    parser.add_argument("--members", type=int, default=MEMBERS, help="training rows (and as many non-members)")
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--dev-rows", type=int, default=DEV_ROWS)
    parser.add_argument("--epsilons", default=EPSILONS, help="comma-separated ε; none: no DP")
    parser.add_argument("--budgets", default=BUDGETS, help="comma-separated Represent token budgets")
    parser.add_argument("--attack-text", default=str(ATTACK_TEXT), help="the tenant's public text")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def smoke_arguments(args: argparse.Namespace) -> tuple[argparse.Namespace, Recipe, AttackPlan]:
    """A tiny model, the shipped SST-2 sample and novels, tiny sizes: every code path, none of the cost."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="offsite-privacy-smoke-"))
    args.model = str(save_tiny_model("llama", work / "model"))
    args.store, args.cells, args.out = str(work / "store"), str(work / "cells"), str(work / "privacy")
    args.emulator, args.seeds, args.members, args.epochs, args.dev_rows = "uniform:1-2-1", "0,1", 32, 8.0, 32
    args.budgets, args.attack_text, args.progress = "0,512,2048", str(GUTENBERG_TEXT), False
    recipe = Recipe(train_rows=args.members, lr=1e-2, batch_size=8, max_length=64)  # a tiny model learns at 1e-2
    return args, recipe, AttackPlan(batch_size=2, seq_len=32, lr=1e-3, warmup_steps=2, text_chars=50_000)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with one_thread_if(args.smoke):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    recipe, attack = load_recipe(Path(args.recipe)), AttackPlan()
    if args.smoke:
        args, recipe, attack = smoke_arguments(args)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    epsilons = parse_epsilons(args.epsilons)
    budgets = sorted({int(b) for b in args.budgets.split(",") if b})
    data = TASKS["sst2_sample" if args.smoke else DP_TASK]()
    if 2 * args.members > len(data.train):
        raise SystemExit(f"--members {args.members}: the training split has {len(data.train)} rows, not twice that")
    plan = DpPlan(data.name, args.members, min(args.dev_rows, len(data.test)), args.epochs, recipe)
    rows = {
        "members": data.train[: plan.members],
        "nonmembers": data.train[plan.members : 2 * plan.members],  # the same split, never trained on
        "dev": data.test[: plan.dev_rows],
    }
    cells = Cells(Path(args.cells))
    bench = None if args.report else PrivacyBench(args, recipe)
    attack_text = Path(args.attack_text)
    text_sha256 = read_public_text(attack_text)[1] if attack_text.is_file() else ""  # the report shows both parts
    if bench is not None and args.part in ("dp", "all"):
        bench.base(plan, data, rows)
        for seed in seeds:
            for epsilon in epsilons:
                bench.dp_cell(plan, data, rows, epsilon, seed)
    if bench is not None and args.part in ("extraction", "all"):
        windows, text_sha256 = attack_windows(bench.tokenizer, attack_text, attack)
        for seed in seeds:
            for budget in budgets:
                bench.extraction_cell(attack, windows, text_sha256, budget, seed)

    dp, reference = dp_rows(args, cells, plan, data, epsilons, seeds)
    private = [r for r in dp if r["epsilon"] is not None]
    report: dict[str, Any] = {
        "dp": dp,
        "dp_reference": reference,
        "dp_target": {
            "auc": AUC_TARGET,
            "met_mean": [r["epsilon"] for r in private if r["mia_auc"] <= AUC_TARGET],
            "met_ci": [r["epsilon"] for r in private if r["mia_auc_ci"][1] <= AUC_TARGET],
            # `offsite train` has no default ε: the default setting is the run without DP
            "default_met": next((r["mia_auc_ci"][1] <= AUC_TARGET for r in dp if r["epsilon"] is None), None),
        }
        if private
        else None,
        "dp_setup": {
            "task": data.name,
            "split": data.split,
            **plan.facts(),
            "nonmembers": plan.members,
            "recipe_summary": f"r={recipe.lora_rank}, α={recipe.lora_alpha}, lr {recipe.lr:g}, batch "
            f"{recipe.batch_size}, the emulator's {recipe.train_blocks} adapter blocks",
            "attack": "loss of the completion under the plugged full model; calibrated: minus the base model's loss",
            "default_dp": "none: offsite train trains without DP unless --dp-epsilon is given "
            f"(δ defaults to {DEFAULT_DP_DELTA:g}, C to {DEFAULT_DP_MAX_GRAD_NORM:g})",
        },
        "extraction": extraction_rows(args, cells, attack, text_sha256, budgets, seeds),
        "extraction_setup": {
            **asdict(attack),
            "text": f"{attack_text.parent.name}/{attack_text.name}",
            "text_sha256": text_sha256,
            "privacy_gap": "report card perplexity_ratio − 1 (emulator / full on WikiText-2 valid's last windows)",
            "represent": "simulated in process: owner/representations.py RepresentationBatcher, then top-k",
        },
        "model": args.model,
        "emulator": args.emulator,
        "seeds": seeds,
        "device": f"Measured on CPU ({platform.machine()}), {torch.get_num_threads()} threads.",
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    write_results(out, report, markdown(report))
    plot(report, out.with_suffix(".png"))
    return {**report, "out": str(out)}


if __name__ == "__main__":
    main()
