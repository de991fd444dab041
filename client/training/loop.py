"""The training loop: completion-only loss, AdamW, linear warm-up then cosine decay, progress bar."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ...common.examples import TokenizedExample
from ...common.scoring import collate, completion_nll
from .config import TrainConfig


@dataclass
class LoopStats:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def fit(
    model: torch.nn.Module, data: list[TokenizedExample], pad_id: int, config: TrainConfig, show_progress: bool = True
) -> LoopStats:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter requires a gradient")
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(total * config.warmup_fraction), total)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(total=total, desc="training", unit="step", disable=not show_progress) as bar:
        step = 0
        while step < total:
            order = list(range(len(data)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                if step >= total:
                    break
                batch = collate([data[i] for i in order[start : start + config.batch_size]], pad_id)
                nll, count = completion_nll(model, batch)
                loss = nll / max(count, 1)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    window = max(1, min(20, len(losses) // 4))
    return LoopStats(
        steps=len(losses),
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        seconds=time.perf_counter() - started,
    )
