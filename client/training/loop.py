"""The training loop: completion-only loss, AdamW, linear warm-up then cosine decay, progress bar.

Without DP it runs on accelerate (`distributed.py`): one process on the best device, or data-parallel under
`accelerate launch --num_processes N`, with the same result.

With `config.dp_epsilon` set it runs DP-SGD through Opacus instead (`_make_private`): Poisson-sampled batches,
every example's gradient clipped to `dp_max_grad_norm`, Gaussian noise calibrated by Opacus' RDP accountant so that
the whole run spends at most (dp_epsilon, dp_delta), and the ε actually spent read back from the same accountant.
Opacus' own module hooks (GradSampleModule) give the per-sample gradients: they work on the PEFT-wrapped emulator
because every trainable module is a LoRA `nn.Linear`; the frozen blocks need none.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ...common import processes
from ...common.adapter_format import LORA
from ...common.examples import TokenizedExample
from ...common.scoring import collate, completion_token_nll
from . import distributed
from .config import TrainConfig

DP_ACCOUNTANT = "rdp"  # Opacus' Rényi accountant: the noise is calibrated and the spent ε read with it


@dataclass
class LoopStats:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    privacy: dict[str, Any] | None = None  # what the DP run spent; None without DP


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean completion NLL, shape [batch]: DP clips per example, so the loss must split by example."""
    nll, rows = completion_token_nll(model, batch)
    size = batch["input_ids"].shape[0]
    counts = torch.bincount(rows, minlength=size).clamp(min=1)
    return torch.zeros(size, dtype=nll.dtype).index_add(0, rows, nll) / counts


def _shuffled(size: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    while True:
        order = list(range(size))
        rng.shuffle(order)
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]


def _secret_generator() -> torch.Generator:
    # The noise and the sampling must not be replayable from the seed in the manifest.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def _make_private(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, size: int, config: TrainConfig, total: int
) -> tuple[Any, torch.optim.Optimizer, Iterator[list[int]]]:
    """Opacus' PrivacyEngine on the trainable LoRA parameters: (engine, DP optimizer, Poisson batches of indices)."""
    from opacus import PrivacyEngine  # imported only for DP: it is slow to import

    if config.method != LORA:
        raise ValueError("differential privacy (--dp-epsilon) is available for --method lora only")
    if config.dp_epsilon is None or not config.dp_epsilon > 0:
        raise ValueError("--dp-epsilon must be a positive number")
    if not 0 < config.dp_delta < 1:
        raise ValueError("--dp-delta must lie in (0, 1), well below 1/examples (e.g. 1e-5)")
    if not config.dp_max_grad_norm > 0:
        raise ValueError("--dp-max-grad-norm must be positive")
    indices = torch.utils.data.TensorDataset(torch.arange(size))
    loader = torch.utils.data.DataLoader(
        indices, batch_size=config.batch_size, generator=_secret_generator()
    )  # its length sets the sampling rate: batch_size / examples
    steps_per_epoch = len(loader)
    engine = PrivacyEngine(accountant=DP_ACCOUNTANT)
    wrapped, private_optimizer, private_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=config.dp_epsilon,
        target_delta=config.dp_delta,
        epochs=total / steps_per_epoch,  # exactly the steps the loop takes, so the plan and the run agree
        max_grad_norm=config.dp_max_grad_norm,
        poisson_sampling=True,
        noise_generator=_secret_generator(),
    )

    def batches() -> Iterator[list[int]]:
        while True:
            for (chosen,) in private_loader:
                yield chosen.tolist()

    engine.wrapped_module = wrapped  # its hooks are removed after training (_detach_opacus)
    return engine, private_optimizer, batches()


def fit(
    model: torch.nn.Module, data: list[TokenizedExample], pad_id: int, config: TrainConfig, show_progress: bool = True
) -> LoopStats:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter requires a gradient")
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    # DP plans its noise for a whole number of steps; rounding down keeps the run within the planned budget
    rounded = math.floor if config.private else math.ceil
    total = max(1, rounded(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(total * config.warmup_fraction), total)
    torch.manual_seed(config.seed)
    engine = None
    accelerator = None
    with warnings.catch_warnings():
        # Opacus warns that its RNG is not cryptographic and that hooks fire on frozen inputs; both are documented
        warnings.filterwarnings("ignore", module=r"opacus\..*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if config.private:
            if processes.process_count() > 1:
                raise ValueError("DP-SGD (--dp-epsilon) runs in one process: do not start it with accelerate launch")
            engine, optimizer, batches = _make_private(model, optimizer, len(data), config, total)
        else:
            batches = _shuffled(len(data), config.batch_size, config.seed)  # the same global batches on every rank
            accelerator = Accelerator()
            objective, optimizer = accelerator.prepare(distributed.CompletionObjective(model), optimizer)
        model.train()
        losses: list[float] = []
        started = time.perf_counter()
        show_progress = show_progress and processes.is_main_process()  # one bar, not one per process
        with tqdm(total=total, desc="training", unit="step", disable=not show_progress) as bar:
            for _, chosen in zip(range(total), batches, strict=False):
                if accelerator is not None:
                    loss, shown = distributed.step_loss(accelerator, objective, data, chosen, pad_id)
                    accelerator.backward(loss)
                    losses.append(shown)
                elif chosen:
                    loss = per_example_loss(model, collate([data[i] for i in chosen], pad_id)).mean()
                    loss.backward()
                    losses.append(loss.item())
                else:  # an empty Poisson batch: the step still runs, and adds pure noise, as the accountant assumes
                    for parameter in trainable:
                        parameter.grad_sample = torch.zeros(0, *parameter.shape, dtype=parameter.dtype)
                if accelerator is not None:
                    accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                if losses:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        model.eval()
    if accelerator is not None:
        model.to("cpu")  # export and evaluation read the weights on the CPU
    privacy = _spent(engine, optimizer, config, total) if engine is not None else None
    if engine is not None:
        _detach_opacus(engine.wrapped_module)
    losses = losses or [float("nan")]
    window = max(1, min(20, len(losses) // 4))
    return LoopStats(
        steps=total,
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        seconds=time.perf_counter() - started,
        privacy=privacy,
    )


def _spent(engine: Any, optimizer: Any, config: TrainConfig, steps: int) -> dict[str, Any]:
    return {
        "mechanism": "DP-SGD (Opacus PrivacyEngine.make_private_with_epsilon, per-sample clipping, Poisson sampling)",
        "accountant": DP_ACCOUNTANT,
        "epsilon": float(engine.get_epsilon(config.dp_delta)),
        "target_epsilon": config.dp_epsilon,
        "delta": config.dp_delta,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "max_grad_norm": config.dp_max_grad_norm,
        "sample_rate": float(engine.accountant.history[-1][1]) if engine.accountant.history else None,
        "steps": steps,
    }


def _detach_opacus(wrapped: Any) -> None:
    """Removes Opacus' hooks and per-sample buffers, so that the model exports and evaluates as a plain one."""
    wrapped._close()  # GradSampleModule: deletes grad_sample, its module attributes and every hook
    for parameter in wrapped.parameters():
        if hasattr(parameter, "summed_grad"):
            del parameter.summed_grad
