"""PEMA as the paper has it and what it adds: the held-out split by sentence and prompt, the normalised
reconstruction error, the initialisation, the learned gate and the planned-length predictor, and their bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from offsite.common.examples import Example
from offsite.common.model_loading import load_model
from offsite.common.pema.adapter import PemaAdapter
from offsite.common.pema.bundle import load_pema, pema_shapes, save_pema
from offsite.common.pema.config import PemaConfig
from offsite.common.pema.head import Head
from offsite.common.pema.length import LengthPredictor
from offsite.common.pema.memory import InvalidMemory, Memory, MemoryWriter
from offsite.common.pema.representation import LocalRepresenter, build_memory, teacher_forcing
from offsite.common.pema.training import gated_log_probs, split_examples, train_pema


def _memory(tmp_path: Path, lengths: list[int], groups: list[int], hidden: int = 8, seed: int = 0) -> Memory:
    generator = torch.Generator().manual_seed(seed)
    writer = MemoryWriter(tmp_path / f"memory-{seed}", sum(lengths), hidden, "float32", {})
    for length, group in zip(lengths, groups, strict=True):
        writer.add(torch.randn(length, hidden, generator=generator), torch.zeros(length, dtype=torch.long), group)
    return writer.close()


def test_validation_holds_out_whole_sentences_and_prompts(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    # E2E-like: one prompt, several references; the old row split put prefixes of one sentence on both sides
    examples = [
        Example(prompt=f"input {i // 3}", completion=f" reference {i} of input {i // 3} with words") for i in range(30)
    ]
    contexts = teacher_forcing(loaded.tokenizer, examples, max_length=64)
    memory = build_memory(LocalRepresenter(loaded.model), contexts, tmp_path / "memory", "float32", {}, batch_size=8)
    split = split_examples(memory, fraction=0.3, seed=0)
    assert not set(split.train_rows) & set(split.validation_rows)
    assert len(split.train_rows) + len(split.validation_rows) == len(memory)
    prompts = [tuple(c.inputs[: c.start]) for c in contexts]
    train_prompts = {prompts[e] for e in split.train_examples}
    assert train_prompts.isdisjoint(prompts[e] for e in split.validation_examples)
    # no held-out context is a prefix of (or equal to) a training context
    train_sequences = [contexts[e].inputs for e in split.train_examples]
    for e in split.validation_examples:
        for end in range(contexts[e].start, len(contexts[e].inputs) + 1):
            prefix = contexts[e].inputs[:end]
            assert not any(seq[:end] == prefix for seq in train_sequences)


def test_a_memory_without_its_examples_is_refused(tmp_path: Path) -> None:
    memory = _memory(tmp_path, [3, 4], [0, 1])
    memory.info.pop("example_rows")
    with pytest.raises(InvalidMemory, match="rebuild it"):
        split_examples(memory, 0.5, 0)
    with pytest.raises(ValueError, match="at least two"):
        split_examples(_memory(tmp_path, [3, 4], [0, 0], seed=1), 0.5, 0)


def test_adapter_starts_as_the_reference_lora_layer() -> None:
    adapter = PemaAdapter(16, 4, dropout=0.0, alpha=2.0)
    assert torch.count_nonzero(adapter.B_pd.weight) == 0 and torch.count_nonzero(adapter.B_rct.weight) == 0
    assert torch.count_nonzero(adapter.A.weight) == adapter.A.weight.numel()
    adapter.B_pd.weight.data.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(adapter.predict_hidden(x), (x @ adapter.A.weight.T @ adapter.B_pd.weight.T) * 0.5)


def test_reconstruction_is_not_dominated_by_one_loud_channel(tmp_path: Path) -> None:
    """Channel 0 carries 100× the scale of the others; the normalised error still makes rank 4 rebuild the rest."""
    generator = torch.Generator().manual_seed(0)
    rows, hidden = 2000, 16
    keys = torch.randn(rows, 4, generator=generator) @ torch.randn(4, hidden, generator=generator)
    keys[:, 0] = 100.0 * torch.randn(rows, generator=generator)  # loud and independent of the rest
    writer = MemoryWriter(tmp_path / "memory", rows, hidden, "float32", {})
    for example, first in enumerate(range(0, rows, 10)):
        writer.add(keys[first : first + 10], torch.zeros(10, dtype=torch.long), example)
    memory = writer.close()
    head = Head("rms", 1e-6, torch.ones(hidden), None, torch.randn(3, hidden, generator=generator))
    config = PemaConfig(rank=4, dropout=0.0, lr=1e-2, batch_size=128, max_epochs=12, patience=3, gate_width=0)
    train_pema(memory, head, config, show_progress=False)
    # the phase-1 autoencoder is not returned; its decoder is: rebuild the quiet channels through B_rct's span
    adapter, _ = train_pema(memory, head, config, show_progress=False)
    span = adapter.B_rct.weight[1:].detach()  # [hidden-1, rank]: the quiet channels the decoder can express
    quiet = keys[:, 1:]
    solution = torch.linalg.lstsq(span, quiet.T).solution
    residual = (span @ solution - quiet.T).pow(2).sum() / quiet.pow(2).sum()
    assert float(residual) < 0.2, "the decoder spends its rank on the quiet channels' 3-dimensional structure"


def test_gate_gives_a_distribution_and_learns_on_held_out_rows(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 3000, 16, 10
    keys = torch.randn(rows, hidden, generator=generator)
    values = (keys @ torch.randn(hidden, vocab, generator=generator)).argmax(-1)
    writer = MemoryWriter(tmp_path / "memory", rows, hidden, "float32", {})
    for example, first in enumerate(range(0, rows, 10)):
        writer.add(keys[first : first + 10], values[first : first + 10], example)
    memory = writer.close()
    head = Head("rms", 1e-6, torch.ones(hidden), None, torch.randn(vocab, hidden, generator=generator))
    config = PemaConfig(rank=8, dropout=0.0, lr=1e-2, batch_size=128, max_epochs=8, patience=2, gate_width=8)
    adapter, report = train_pema(memory, head, config, show_progress=False)
    assert report.gate is not None and report.gate.epochs >= 1
    states, _ = memory.batch(np.arange(64))
    with torch.no_grad():
        mixed = gated_log_probs(adapter, head, states)
        hidden_states = adapter.predict_hidden(states)
        lm = torch.log_softmax(head.logits(states), -1)
        pema = torch.log_softmax(head.logits(hidden_states), -1)
        weights = adapter.gate(states, hidden_states, head, lm, pema)
    torch.testing.assert_close(torch.logsumexp(mixed, -1), torch.zeros(64), atol=1e-5, rtol=0)
    assert bool(((weights > 0) & (weights < 1)).all())
    # the head alone knows nothing of the task, PEMA does: the gate learns to lean on PEMA
    assert float(weights.mean()) > 0.5


def test_length_predictor_beats_the_mean_on_held_out_prompts() -> None:
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(400, 12, generator=generator) * 50 + 7
    lengths = (torch.exp(2.5 + 0.5 * torch.tanh(states[:, 3] / 50)) + torch.rand(400, generator=generator)).long()
    predictor = LengthPredictor(12)
    predictor.fit(states[:300], lengths[:300], ridge=1e-2)
    mae = (predictor(states[300:]) - lengths[300:]).abs().float().mean()
    baseline = (lengths[:300].float().mean().round() - lengths[300:]).abs().float().mean()
    assert float(mae) < 0.6 * float(baseline)
    assert int(predictor(states[:5]).min()) >= 1


def test_bundle_round_trip_with_gate_and_length(tmp_path: Path) -> None:
    config = PemaConfig(rank=4, gate_width=3, length_predictor=True)
    adapter = PemaAdapter(10, 4, 0.0, config.alpha, config.gate_width, config.length_predictor)
    for parameter in adapter.parameters():
        parameter.data.normal_()
    adapter.length.weight.normal_()
    save_pema(adapter, config, tmp_path)
    loaded, loaded_config = load_pema(tmp_path)
    assert loaded_config == config
    for name, tensor in adapter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert set(adapter.state_dict()) == set(pema_shapes(10, 4, 3, True))
    assert set(PemaAdapter(10, 4).state_dict()) == set(pema_shapes(10, 4))


def test_every_generation_training_sequence_ends_with_end_of_text(tiny_model_dir) -> None:
    """Without EOS in training, an adapter never learns to stop and rambles to the token limit."""
    from offsite.common.examples import IGNORE, tokenize_for_training

    tokenizer = load_model(str(tiny_model_dir("llama"))).tokenizer
    examples = [Example(prompt=f"facts {i}:", completion=f" a sentence of {i} words") for i in range(5)]
    for context in teacher_forcing(tokenizer, examples, max_length=64):  # the PEMA memory
        assert context.targets[-1] == tokenizer.eos_token_id
    for tokenized in tokenize_for_training(tokenizer, examples, max_length=64):  # LoRA and full-block training
        labels = [label for label in tokenized.labels if label != IGNORE]
        assert labels[-1] == tokenizer.eos_token_id


def _two_cue_memory(tmp_path: Path, name: str, keys: torch.Tensor, values: torch.Tensor) -> Memory:
    writer = MemoryWriter(tmp_path / name, len(keys), keys.shape[1], "float32", {})
    for example, first in enumerate(range(0, len(keys), 10)):
        writer.add(keys[first : first + 10], values[first : first + 10], example)
    return writer.close()


def test_key_noise_keeps_the_adapter_off_directions_where_the_two_models_disagree(tmp_path: Path) -> None:
    """The memory's keys carry the label twice: weakly along u (shared with the full model's states) and strongly
    along w (where the emulator's states differ: the full model's carry no label there). Noise along w in training
    makes PEMA use u, so it predicts better from the full model's states."""
    generator = torch.Generator().manual_seed(0)
    rows, hidden = 3000, 16
    u, w = torch.eye(hidden)[0], torch.eye(hidden)[1]
    values = torch.randint(0, 2, (rows,), generator=generator)
    sign = (2 * values - 1).float().unsqueeze(1)
    base = 0.3 * torch.randn(rows, hidden, generator=generator) + sign * u + 2.0 * torch.ones(hidden)
    emulator_keys = base + 3.0 * sign * w
    full_keys = base + 3.0 * torch.sign(torch.randn(rows, 1, generator=generator)) * w
    emulator, full = (_two_cue_memory(tmp_path, n, k, values) for n, k in (("e", emulator_keys), ("f", full_keys)))
    head = Head("rms", 1e-6, torch.ones(hidden), None, torch.randn(2, hidden, generator=generator))
    config = PemaConfig(
        rank=4, dropout=0.0, lr=1e-2, batch_size=128, max_epochs=10, patience=3, gate_width=0, length_predictor=False
    )
    noise = torch.outer(w, w) * 3.0  # F with F·Fᵀ = 9·w·wᵀ: the disagreement's covariance along w

    def loss_on_full(adapter: PemaAdapter) -> float:
        keys, labels = full.batch(np.arange(rows))
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(head.logits(adapter.predict_hidden(keys)), labels))

    plain, _ = train_pema(emulator, head, config, show_progress=False)
    robust, _ = train_pema(emulator, head, config, show_progress=False, key_noise=noise)
    assert loss_on_full(robust) < 0.8 * loss_on_full(plain), (loss_on_full(robust), loss_on_full(plain))
    with pytest.raises(ValueError, match="key noise must be"):
        train_pema(emulator, head, config, show_progress=False, key_noise=torch.eye(3))
