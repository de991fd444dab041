"""PEMA's core: the memory round trip, the head, Gradual Unrolling arithmetic, and both training phases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from offsite.common.examples import Example
from offsite.common.model_loading import load_model
from offsite.common.pema.config import PemaConfig
from offsite.common.pema.head import Head
from offsite.common.pema.memory import KEYS_FILE, InvalidMemory, Memory, MemoryWriter
from offsite.common.pema.representation import LocalRepresenter, build_memory, own_generation, teacher_forcing
from offsite.common.pema.training import train_pema
from offsite.common.pema.unrolling import mix, unrolling_lambda, unrolling_lambdas


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_memory_round_trip(tmp_path: Path, dtype: str) -> None:
    keys = torch.randn(10, 6)
    values = torch.arange(10) * 7
    writer = MemoryWriter(tmp_path / "memory", 10, 6, dtype, {"source": "test"})
    writer.add(keys[:4], values[:4], group=0)
    writer.add(keys[4:], values[4:], group=0)
    memory = writer.close()
    assert not (tmp_path / "memory.partial").exists()
    reopened = Memory.open(tmp_path / "memory")
    assert len(reopened) == 10 and reopened.hidden_size == 6 and reopened.info["source"] == "test"
    assert isinstance(reopened.keys, np.memmap) or reopened.keys.base is not None  # memory-mapped, not read whole
    got_keys, got_values = reopened.batch(np.array([3, 1]))
    tolerance = 1e-3 if dtype == "float16" else 0.0
    torch.testing.assert_close(got_keys, keys[[1, 3]], atol=tolerance, rtol=tolerance)
    assert got_values.tolist() == [7, 21]
    assert len(memory) == 10
    starts, counts, groups = reopened.examples()
    assert starts.tolist() == [0, 4] and counts.tolist() == [4, 6] and groups.tolist() == [0, 0]


def test_incomplete_memories_are_refused(tmp_path: Path) -> None:
    writer = MemoryWriter(tmp_path / "memory", 3, 4, "float32", {})
    writer.add(torch.zeros(2, 4), torch.zeros(2), group=0)
    with pytest.raises(InvalidMemory, match="holds 2 of 3 rows"):
        writer.close()
    complete = MemoryWriter(tmp_path / "ok", 2, 4, "float32", {})
    complete.add(torch.zeros(2, 4), torch.zeros(2), group=0)
    complete.close()
    (tmp_path / "ok" / KEYS_FILE).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InvalidMemory, match="not a complete memory"):
        Memory.open(tmp_path / "ok")


def test_gradual_unrolling_schedule_is_the_reference_codes() -> None:
    assert unrolling_lambda(0, 10, 0.9) == pytest.approx(0.9)  # the first token takes λ_max, not squared
    assert unrolling_lambda(1, 10, 0.9) == pytest.approx(0.81**2)
    assert unrolling_lambda(5, 10, 0.9) == pytest.approx(0.45**2)
    # the decrement stops before λ reaches zero: (λ_max / L)² from step L − 1 on
    assert unrolling_lambda(9, 10, 0.9) == unrolling_lambda(15, 10, 0.9) == pytest.approx(0.09**2)
    batch = unrolling_lambdas(5, torch.tensor([10, 20]), 0.9)
    torch.testing.assert_close(batch, torch.tensor([0.45**2, 0.675**2]))
    assert [unrolling_lambda(step, 10, 0.9, "constant") for step in (0, 5, 10, 15)] == [0.9] * 4
    with pytest.raises(ValueError, match="at least 1"):
        unrolling_lambda(0, 0, 0.9)


def test_mix_is_a_log_space_mixture() -> None:
    pema = torch.log_softmax(torch.randn(7), -1)
    lm = torch.log_softmax(torch.randn(7), -1)
    assert torch.equal(mix(pema, lm, 0.0), lm) and torch.equal(mix(pema, lm, 1.0), pema)
    mixed = mix(pema, lm, 0.3)
    torch.testing.assert_close(mixed.exp(), 0.3 * pema.exp() + 0.7 * lm.exp())
    assert float(torch.logsumexp(mixed, -1)) == pytest.approx(0.0, abs=1e-6)
    rows = mix(torch.stack([pema, pema]), torch.stack([lm, lm]), torch.tensor([0.0, 0.3]))
    torch.testing.assert_close(rows, torch.stack([lm, mixed]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_and_representations_reproduce_the_models_logits(tiny_model_dir, family: str, tmp_path: Path) -> None:
    model = load_model(str(tiny_model_dir(family))).model
    representer = LocalRepresenter(model)
    states, logits = representer.forward([[5, 6, 7, 8], [9, 10]])
    head = Head.from_model(model)
    head.save(tmp_path / "head")
    reloaded = Head.load(tmp_path / "head")
    for state, expected in zip(states, logits, strict=True):
        torch.testing.assert_close(reloaded.logits(state), expected, atol=1e-5, rtol=1e-5)
    alone = model(input_ids=torch.tensor([[9, 10]])).logits[0]
    torch.testing.assert_close(logits[1], alone, atol=1e-5, rtol=1e-5)  # padding does not leak into a row


def test_teacher_forcing_memory_has_one_row_per_target(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    examples = [Example(prompt="a b", completion=" c d"), Example(prompt="e", completion=" f g h")]
    contexts = teacher_forcing(loaded.tokenizer, examples, max_length=64)
    representer = LocalRepresenter(loaded.model)
    memory = build_memory(representer, contexts, tmp_path / "memory", "float32", {}, batch_size=2)
    assert len(memory) == sum(len(c.targets) for c in contexts)
    first = contexts[0]
    assert memory.values[: len(first.targets)].tolist() == first.targets
    state = representer.represent([first.inputs[: first.start]])[0][-1]
    torch.testing.assert_close(torch.from_numpy(np.array(memory.keys[0])), state, atol=1e-5, rtol=1e-5)


def test_own_generation_contexts_continue_with_the_models_greedy_tokens(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    examples = [Example(prompt="a b", completion=" c d e"), Example(prompt="e", completion=" f g h i j")]
    gold = teacher_forcing(loaded.tokenizer, examples, max_length=64)
    representer = LocalRepresenter(loaded.model)
    own = own_generation(representer, gold, batch_size=2)
    for mine, theirs in zip(own, gold, strict=True):
        assert mine.targets == theirs.targets and mine.start == theirs.start
        assert mine.inputs[: mine.start] == theirs.inputs[: theirs.start] and len(mine.inputs) == len(theirs.inputs)
        with torch.no_grad():
            for end in range(mine.start, len(mine.inputs)):
                logits = loaded.model(input_ids=torch.tensor([mine.inputs[:end]])).logits[0, -1]
                assert mine.inputs[end] == int(logits.argmax()), "each context grows by the model's greedy token"
    assert any(m.inputs != g.inputs for m, g in zip(own, gold, strict=True)), "a random model does not echo gold"
    memory = build_memory(representer, own, tmp_path / "memory", "float32", {}, batch_size=2)
    assert memory.values.tolist() == [t for c in gold for t in c.targets]


def _synthetic_memory(
    tmp_path: Path, rows: int = 2000, hidden: int = 32, vocab: int = 12, per_example: int = 10
) -> tuple[Memory, Head]:
    """Keys in an 8-dimensional subspace; each key's value is the class a fixed random probe picks."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(rows, 8, generator=generator) @ torch.randn(8, hidden, generator=generator)
    values = (keys @ torch.randn(hidden, vocab, generator=generator)).argmax(-1)
    writer = MemoryWriter(tmp_path / "memory", rows, hidden, "float32", {})
    for example, first in enumerate(range(0, rows, per_example)):
        writer.add(keys[first : first + per_example], values[first : first + per_example], group=example)
    head = Head("rms", 1e-6, torch.ones(hidden), None, torch.randn(vocab, hidden, generator=generator))
    return writer.close(), head


def test_both_phases_lower_their_losses_on_a_learnable_task(tmp_path: Path) -> None:
    memory, head = _synthetic_memory(tmp_path)
    config = PemaConfig(rank=8, dropout=0.0, lr=1e-2, batch_size=128, max_epochs=15, patience=3)
    adapter, report = train_pema(memory, head, config, show_progress=False)
    phase1, phase2 = report.phase1.validation_loss, report.phase2.validation_loss
    assert min(phase1) < 0.1 * phase1[0], phase1  # rank 8 can rebuild an 8-dimensional subspace
    assert min(phase2) < 0.7 * phase2[0], phase2
    keys, values = memory.batch(np.arange(len(memory)))
    with torch.no_grad():
        accuracy = float((adapter.log_probs(keys, head).argmax(-1) == values).float().mean())
    assert accuracy > 0.6, f"accuracy {accuracy:.2f} (chance is about {1 / 12:.2f})"
    assert report.phase2_validation_ce < math.log(12)
