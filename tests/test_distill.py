"""The distilled emulator: it lowers held-out NMSE, trains only the middle, resumes, bundles; its shipped corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT
from tiny_models import DEPTH
from transformers import AutoModelForCausalLM

from offsite.common.architectures import block_prefix, blocks, spec_for
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.emulator import EmulatorSpec, build_emulator, distill, uniform
from offsite.owner.emulator.bundle import materialize
from offsite.owner.emulator.distill import (
    DEFAULT_TOKENS,
    DistillConfig,
    DistillReport,
    config_for,
    distill_middle,
    gap_exits,
    kept_boundaries,
    nmse,
    teacher_targets,
)
from offsite.owner.emulator.layout import Layout, LayoutError
from offsite.owner.emulator.public_text import (
    CHAT_PLACEHOLDER,
    GUTENBERG_HELDOUT_TEXT,
    GUTENBERG_TEXT,
    PublicTextError,
    TextChunks,
    chat_shaped,
    chat_turn_ids,
    load_chunks,
    strip_gutenberg,
    teacher_samples,
    with_teacher_samples,
)

LAYOUT = Layout.parse(TINY_LAYOUT)
ADAPTERS = LAYOUT.adapter_blocks(DEPTH)
CONFIG = DistillConfig(steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=4)
NOVEL_CHARS = 40_000  # of each shipped novel file: enough windows for the tiny model, seconds to tokenize
HELDOUT_NMSE_WINDOWS = 64
HELDOUT_NMSE_CUT = 0.2  # distillation must remove at least this share of the uniform drop's held-out NMSE


@pytest.fixture()
def public_text(tmp_path: Path) -> Path:
    path = tmp_path / "public.txt"
    sentences = [
        "the river runs past the old mill and into the sea",
        "a small town sits at the foot of the green hills",
        "in winter the roads are closed and the market is quiet",
        "the museum keeps maps, coins and letters from the war",
    ]
    path.write_text(" ".join(sentences * 12))
    return path


@pytest.fixture()
def novels(tmp_path: Path) -> tuple[Path, Path]:
    """The start of the shipped training novels and of the held-out novel, which shares no text with them."""
    train, heldout = tmp_path / "novels.txt", tmp_path / "heldout.txt"
    train.write_text(GUTENBERG_TEXT.read_text(encoding="utf-8")[:NOVEL_CHARS])
    heldout.write_text(GUTENBERG_HELDOUT_TEXT.read_text(encoding="utf-8")[:NOVEL_CHARS])
    return train, heldout


def _middle_nmse(full, emulator, block_map: list[int], chunks: torch.Tensor) -> float:
    [(teacher_index, student_index)] = gap_exits(block_map, ADAPTERS, len(blocks(full)))
    with torch.no_grad():
        target = full.base_model(input_ids=chunks, output_hidden_states=True).hidden_states[teacher_index]
        student = emulator(input_ids=chunks, output_hidden_states=True).hidden_states[student_index]
    return float(nmse(target, student))


def _pretrain(model: torch.nn.Module, chunks: torch.Tensor, steps: int = 60) -> None:
    """A random teacher has nothing to teach: fit the tiny full model to the text first."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = chunks[(step * 4) % len(chunks) :][:4]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _setup(tiny_model_dir, public_text: Path):
    loaded = load_model(str(tiny_model_dir("llama")))
    text = load_chunks(loaded.tokenizer, public_text, CONFIG.seq_len, heldout_fraction=0.2)
    _pretrain(loaded.model, text.train)
    block_map = uniform.select_blocks(loaded.model, LAYOUT)
    return loaded, block_map, text


def test_nmse_is_zero_for_a_perfect_student_and_scale_free() -> None:
    teacher = torch.randn(2, 5, 8)
    assert float(nmse(teacher, teacher)) == 0.0
    assert float(nmse(teacher, torch.zeros_like(teacher))) == pytest.approx(1.0, rel=1e-5)
    assert float(nmse(10 * teacher, 10 * teacher + 10)) == pytest.approx(float(nmse(teacher, teacher + 1)), rel=1e-4)


def test_distillation_cuts_heldout_nmse_and_trains_only_the_middle(
    tiny_model_dir, novels: tuple[Path, Path], tmp_path: Path
) -> None:
    # Llama: on tiny GPT-2 the dropped blocks hardly matter, so there is nothing to distil.
    loaded = load_model(str(tiny_model_dir("llama")))
    text = load_chunks(loaded.tokenizer, novels[0], CONFIG.seq_len, 0.0, heldout_path=novels[1])
    _pretrain(loaded.model, text.train)
    block_map = uniform.select_blocks(loaded.model, LAYOUT)
    emulator = materialize(loaded.model, block_map)
    before_state = {k: v.clone() for k, v in emulator.state_dict().items()}
    # Held-out windows that not even the checkpoint choice saw.
    heldout = text.heldout[CONFIG.max_heldout_chunks : CONFIG.max_heldout_chunks + HELDOUT_NMSE_WINDOWS]
    before = _middle_nmse(loaded.model, emulator, block_map, heldout)

    config = DistillConfig(steps=40, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=4, eval_every=10)
    report = distill_middle(
        loaded.model, emulator, block_map, ADAPTERS, text, config, tmp_path / "work", show_progress=False
    )

    after = _middle_nmse(loaded.model, emulator, block_map, heldout)
    print(f"held-out NMSE {before:.4f} -> {after:.4f}")
    assert after <= (1 - HELDOUT_NMSE_CUT) * before, f"held-out NMSE {before:.4f} -> {after:.4f}"
    assert report.best_heldout_nmse < report.start_heldout_nmse
    spec = spec_for(emulator.config)
    middle = tuple(block_prefix(spec, i) for i in range(LAYOUT.bottom, LAYOUT.bottom + LAYOUT.middle))
    changed = {k for k, v in emulator.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed, "distillation changed nothing"
    assert all(key.startswith(middle) for key in changed), sorted(changed)


def test_kept_boundaries_pair_the_state_after_every_kept_middle_block() -> None:
    # 1-2-1 of six blocks keeps 1 and 4: the student's state entering emulator block 2 (full block 4) is compared
    # with the teacher's entering block 4, and the state entering the top adapter (block 5) with the teacher's.
    assert kept_boundaries([0, 1, 4, 5], [0, 5], DEPTH) == [(4, 2), (5, 3)]
    assert kept_boundaries([0, 2, 5], [0, 5], DEPTH) == [(5, 2)]
    assert kept_boundaries([0, 3], [0], DEPTH) == [(DEPTH, 2)]  # no top adapter: the final state
    # Adapters 1 and 3: block 0 is kept, the gap [2] keeps nothing but its exit still counts.
    assert kept_boundaries([0, 1, 3, 4], [1, 3], DEPTH) == [(1, 1), (3, 2), (DEPTH, 4)]


def test_the_budget_is_tokens_or_steps() -> None:
    assert config_for({}).steps * config_for({}).tokens_per_step >= DEFAULT_TOKENS
    assert config_for({"tokens": 1000}).steps == 2  # 512 tokens a step, rounded up
    assert config_for({"steps": 7, "kd": 0.5}).steps == 7 and config_for({"kd": 0.5}).kd_weight == 0.5
    assert config_for({"exit": 30.0}).exit_weight == 30.0 and config_for({}).exit_weight == 0.0
    with pytest.raises(LayoutError, match="not both"):
        config_for({"steps": 7, "tokens": 1000})


def test_logit_kd_trains_too(tiny_model_dir, public_text: Path, tmp_path: Path) -> None:
    loaded, block_map, text = _setup(tiny_model_dir, public_text)
    emulator = materialize(loaded.model, block_map)
    config = DistillConfig(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=4, kd_weight=1.0)
    report = distill_middle(loaded.model, emulator, block_map, ADAPTERS, text, config, tmp_path, show_progress=False)
    assert report.steps == 4 and report.last_nmse == report.last_nmse  # finite, not nan


def _exit_only_run(setup: tuple, directory: Path, **weights: float) -> DistillReport:
    """Eight steps of the tiny model's distillation with no boundary NMSE: only `weights`' exit terms and the LM."""
    loaded, block_map, text = setup
    emulator = materialize(loaded.model, block_map)
    config = DistillConfig(
        steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=8, nmse_weight=0.0, **weights
    )
    return distill_middle(loaded.model, emulator, block_map, ADAPTERS, text, config, directory, show_progress=False)


def test_exit_weight_pulls_the_gap_exit_towards_the_teacher(tiny_model_dir, public_text: Path, tmp_path: Path) -> None:
    setup = _setup(tiny_model_dir, public_text)
    plain = _exit_only_run(setup, tmp_path / "plain")
    weighted = _exit_only_run(setup, tmp_path / "weighted", exit_weight=30.0)
    assert weighted.best_heldout_nmse < plain.best_heldout_nmse


def test_whiten_weight_cuts_the_whitened_exit_error(tiny_model_dir, public_text: Path, tmp_path: Path) -> None:
    setup = _setup(tiny_model_dir, public_text)
    plain = _exit_only_run(setup, tmp_path / "plain")
    whitened = _exit_only_run(setup, tmp_path / "whitened", whiten_weight=3.0)
    # Both runs measure the whitened error from the same start; only the one that trains on it brings it down.
    assert plain.start_heldout_whitened == pytest.approx(whitened.start_heldout_whitened)
    assert whitened.best_heldout_whitened < plain.best_heldout_whitened
    assert whitened.best_heldout_whitened < whitened.start_heldout_whitened
    assert config_for({"whiten": 3.0}).whiten_weight == 3.0 and config_for({}).whiten_weight == 0.0


def test_an_interrupted_distillation_resumes_where_it_stopped(
    tiny_model_dir, public_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, block_map, text = _setup(tiny_model_dir, public_text)
    straight = materialize(loaded.model, block_map)
    distill_middle(
        loaded.model, straight, block_map, ADAPTERS, text, CONFIG, tmp_path / "straight", show_progress=False
    )

    real_order = distill.batch_order

    def crash_at_step_6(count: int, batch_size: int, seed: int, step: int) -> list[int]:
        if step == 6:
            raise KeyboardInterrupt
        return real_order(count, batch_size, seed, step)

    interrupted = materialize(loaded.model, block_map)
    monkeypatch.setattr(distill, "batch_order", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        distill_middle(
            loaded.model, interrupted, block_map, ADAPTERS, text, CONFIG, tmp_path / "resumed", show_progress=False
        )
    monkeypatch.setattr(distill, "batch_order", real_order)

    resumed = materialize(loaded.model, block_map)  # a fresh process would start from the uniform drop again
    report = distill_middle(
        loaded.model, resumed, block_map, ADAPTERS, text, CONFIG, tmp_path / "resumed", show_progress=False
    )
    assert report.resumed_from == 4  # the last checkpoint before the crash
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_run_is_not_resumed(tiny_model_dir, public_text: Path, tmp_path: Path) -> None:
    loaded, block_map, text = _setup(tiny_model_dir, public_text)
    distill_middle(
        loaded.model,
        materialize(loaded.model, block_map),
        block_map,
        ADAPTERS,
        text,
        CONFIG,
        tmp_path / "w",
        show_progress=False,
    )
    other = TextChunks(text.train.flip(0), text.heldout, sha256="other")
    report = distill_middle(
        loaded.model,
        materialize(loaded.model, block_map),
        block_map,
        ADAPTERS,
        other,
        CONFIG,
        tmp_path / "w",
        show_progress=False,
    )
    assert report.resumed_from == 0


def test_distilled_bundle_loads_in_transformers_and_records_the_run(
    tiny_model_dir, public_text: Path, tmp_path: Path
) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    spec = EmulatorSpec.parse(f"distill:{TINY_LAYOUT},steps=3,data={public_text}")
    assert spec.id.startswith(f"distill-{TINY_LAYOUT}-") and spec.id != EmulatorSpec.parse(f"distill:{TINY_LAYOUT}").id
    key = load_or_create_private_key(tmp_path / "key.pem")
    out = tmp_path / "emulator"
    manifest = build_emulator(
        loaded.model, loaded.tokenizer, spec, out, key, fingerprint(loaded.model), "tiny", show_progress=False
    )
    assert manifest["method"] == "distill" and manifest["block_map"] == [0, 1, 4, 5]
    assert manifest["params"]["steps"] == 3 and len(manifest["params"]["public_text_sha256"]) == 64
    assert not (tmp_path / "emulator.work").exists()
    emulator = AutoModelForCausalLM.from_pretrained(out)
    # The adapter blocks are still the full model's own: that is what makes plug-in possible.
    for emulator_index, full_index in ((0, 0), (3, 5)):
        ours, theirs = blocks(emulator)[emulator_index].state_dict(), blocks(loaded.model)[full_index].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill:1-2-1,steps=0", "steps=.*positive"),
        ("distill:1-2-1,colour=red", "has no option 'colour'"),
        ("uniform:1-2-1,steps=3", "has no option 'steps'"),
        ("distill:1-2-1,steps", "key=value"),
        ("distill:1-2-1,chat=1.5", "fraction in \\[0, 1\\]"),
        ("distill:1-2-1,teacher=fp16", "bf16 or fp32"),
    ],
)
def test_bad_emulator_options_are_explained(text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        EmulatorSpec.parse(text)


def test_a_bf16_teacher_gives_fp32_targets_close_to_the_fp32_teachers(tiny_model_dir) -> None:
    full = load_model(str(tiny_model_dir("llama"))).model.eval()
    batch = torch.randint(0, full.config.vocab_size, (2, 16))
    plain, _ = teacher_targets(full, batch, config_for({}))
    fast, _ = teacher_targets(full, batch, config_for({"teacher": True}))
    assert config_for({}).bf16_teacher is False and all(state.dtype == torch.float32 for state in fast)
    distances = [float(nmse(a, b)) for a, b in zip(plain, fast, strict=True)]
    assert 0.0 < max(distances) < 1e-3  # rounded, so not the same numbers; but far below any distillation's NMSE


def test_too_little_public_text_is_explained(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(PublicTextError, match="at least 32 are needed"):
        load_chunks(loaded.tokenizer, short, 16, 0.1)
    with pytest.raises(PublicTextError, match="cannot read public text"):
        load_chunks(loaded.tokenizer, tmp_path / "missing.txt", 16, 0.1)


def test_gutenberg_header_and_licence_are_stripped() -> None:
    raw = (
        "\ufeffThe Project Gutenberg EBook of A Tale, by Someone\r\n\r\nThis eBook is for the use of anyone\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\n\r\nProduced by A. Volunteer\r\n\r\n"
        "CHAPTER I.\r\n\r\nIt was a dark\r\nand stormy night.\r\n\r\n"
        "End of the Project Gutenberg EBook of A Tale, by Someone\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\nSection 1. General Terms of Use\r\n"
    )
    assert strip_gutenberg(raw) == "CHAPTER I.\n\nIt was a dark\nand stormy night."
    with pytest.raises(PublicTextError, match="START and END"):
        strip_gutenberg("just a story, no markers")


def test_the_shipped_corpus_is_stripped_and_disjoint() -> None:
    train, heldout = (path.read_text(encoding="utf-8") for path in (GUTENBERG_TEXT, GUTENBERG_HELDOUT_TEXT))
    for text in (train, heldout):
        assert "\r" not in text and "\ufeff" not in text and "gutenberg" not in text.lower()
    assert GUTENBERG_TEXT.stat().st_size + GUTENBERG_HELDOUT_TEXT.stat().st_size < 3_000_000
    paragraphs = {p for p in train.split("\n\n") if len(p) > 200}
    assert not paragraphs & set(heldout.split("\n\n"))


def test_chat_shaped_windows_wrap_the_public_text_in_the_models_chat_template(tiny_model_dir) -> None:
    tokenizer = load_model(str(tiny_model_dir("llama"))).tokenizer
    windows = torch.arange(10 * 64).view(10, 64) % 200 + 3  # ids above the special tokens
    assert chat_shaped(tokenizer, windows, 0.5) is windows  # no chat template: nothing to imitate
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    shaped = chat_shaped(tokenizer, windows, 0.5)
    assert shaped.shape == windows.shape
    changed = [row for row in range(10) if not torch.equal(shaped[row], windows[row])]
    assert len(changed) == 5
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    head, tail = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in rendered.split(CHAT_PLACEHOLDER))
    room = 64 - len(head) - len(tail)
    for row in changed:
        original = windows[row].tolist()
        splits = [u for u in range(1, room) if shaped[row].tolist() == head + original[:u] + tail + original[u:room]]
        assert len(splits) == 1  # the template's head, a user turn of the text, the marker, the text's continuation
    assert torch.equal(chat_shaped(tokenizer, windows, 0.0), windows)


def test_the_teacher_writes_its_own_windows_from_the_chat_templates_head(tiny_model_dir) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    tokenizer = loaded.tokenizer
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    head, _ = chat_turn_ids(tokenizer)
    own = teacher_samples(loaded.model, tokenizer, count=5, seq_len=24, seed=3, batch_size=2)
    assert own.shape == (5, 24)
    assert all(row[: len(head)].tolist() == head for row in own)
    assert len({tuple(row.tolist()) for row in own}) == 5  # one prompt, five different texts
    assert torch.equal(own, teacher_samples(loaded.model, tokenizer, count=5, seq_len=24, seed=3, batch_size=2))

    corpus = torch.arange(40 * 24).view(40, 24) % 200 + 3
    mixed = with_teacher_samples(loaded.model, tokenizer, corpus, seen=12, fraction=0.25, seed=3)
    assert mixed.shape == (12, 24)
    from_teacher = [row for row in mixed if row[: len(head)].tolist() == head]
    assert len(from_teacher) == 3
    corpus_rows = {tuple(row.tolist()) for row in corpus}
    assert sum(tuple(row.tolist()) in corpus_rows for row in mixed) == 9
    assert config_for({"sample": 0.5}).sample_fraction == 0.5 and config_for({}).sample_fraction == 0.0
