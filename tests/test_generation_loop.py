"""The one token loop (common/generation): how rows end (end-of-text, stop strings, the cap), what the stream holds
back, that the KV-cache + left-padding stepper decodes what the model alone would, and that sampling gives the
same text for the same seed on the local, owner-side and remote PEMA paths."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessOwner
from peft import LoraConfig, get_peft_model
from tiny_models import FAMILIES, VOCAB, tokenizer

from offsite.client.connection import RemoteError
from offsite.client.pema_generation import generate_remote_pema
from offsite.client.pull import pull_head
from offsite.client.push import push_adapter
from offsite.common.adapter_format import PEMA
from offsite.common.contract import HEAD_ARTIFACT
from offsite.common.emulator_loading import load_emulator
from offsite.common.examples import encode
from offsite.common.generation.loop import EOS, LENGTH, STOP, complete, decode, model_policy, stream
from offsite.common.generation.sampling import SamplingConfig
from offsite.common.generation.steppers import LocalStepper, ReadingStepper, StepResult
from offsite.common.manifest import read_manifest, write_manifest
from offsite.common.model_loading import load_model
from offsite.common.pema.adapter import PemaAdapter
from offsite.common.pema.bundle import load_pema, save_pema
from offsite.common.pema.config import PemaConfig
from offsite.common.pema.head import Head
from offsite.common.pema.policy import pema_policy
from offsite.common.pema.representation import LocalRepresenter
from offsite.common.rpc import pb

EOS_ID = 2
PROMPTS = ["the movie", "a dull, boring film with a terrible", "Review:"]  # different lengths: left padding


class ScriptedStepper:
    """Row r's log P_LM puts all mass on scripts[r][n] at its n-th step: the loop's logic without a model."""

    def __init__(self, scripts: Sequence[Sequence[int]]):
        self.scripts = scripts
        self.steps: list[int] = []
        self.asked: list[list[int]] = []  # the rows each advance named

    def _result(self, rows: Sequence[int]) -> StepResult:
        log_probs = torch.full((len(rows), VOCAB), -1e9)
        for k, row in enumerate(rows):
            log_probs[k, self.scripts[row][self.steps[row]]] = 0.0
        return torch.zeros(len(rows), 4), log_probs

    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        self.steps = [0] * len(prompts)
        return self._result(range(len(prompts)))

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        self.asked.append(list(rows))
        for row in rows:
            self.steps[row] += 1
        return self._result(rows)


def _ids(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def _run(scripts: list[list[int]], sampling: SamplingConfig) -> tuple[ScriptedStepper, list[list]]:
    stepper = ScriptedStepper(scripts)
    steps = list(decode(stepper, [[1]] * len(scripts), model_policy, sampling, EOS_ID, tokenizer()))
    return stepper, steps


def test_a_stop_string_across_tokens_ends_the_row_and_is_cut_from_the_text() -> None:
    tokens = _ids("the movie was great")  # 't', 'he', ' m', 'ovie', ' was', ' g', 'reat'
    assert tokenizer().decode(tokens[3:5]) == "ovie was"
    stepper, steps = _run([tokens, _ids(" and the actors were wonderful")], SamplingConfig(8, stop=("ie wa",)))
    pieces = [p for step in steps for p in step if p.row == 0]
    assert [p.finish for p in pieces] == [None] * 4 + [STOP]
    assert pieces[-1].token == tokens[4]  # the token completing the stop string is kept; its text is not
    assert "".join(p.text for p in pieces) == "the mov"
    # "ie" may start the stop string: it waits, and when the stop string completes it is never sent.
    assert [p.text for p in pieces] == ["t", "he", " m", "ov", ""]
    assert all(0 not in rows for rows in stepper.asked[4:])  # a row that ended is never stepped again

    # Of two stop strings, the one that comes first in the text ends it.
    sampling = SamplingConfig(8, stop=("ie wa", "he m"))
    [completion] = complete(ScriptedStepper([tokens]), [[1]], model_policy, sampling, EOS_ID, tokenizer())
    assert completion.text == "t" and completion.finish == STOP and completion.tokens == tokens[:3]


def test_a_held_back_stop_prefix_that_never_completes_is_sent_at_the_end() -> None:
    tokens = _ids("the movie")
    [last] = _run([tokens + [EOS_ID]], SamplingConfig(8, stop=("ie!",)))[1][-1]
    assert (last.token, last.text, last.finish) == (None, "ie", EOS)


def test_end_of_text_ends_one_row_while_the_others_run_to_the_cap() -> None:
    first, second = _ids("the movie"), _ids("a dull, boring film with a terrible plot")
    stepper = ScriptedStepper([[*first, EOS_ID], second])
    done = complete(stepper, [[1], [1]], model_policy, SamplingConfig(6), EOS_ID, tokenizer())
    assert (done[0].tokens, done[0].text, done[0].finish) == (first, "the movie", EOS)
    assert (done[1].tokens, done[1].finish) == (second[:6], LENGTH)
    assert done[1].text == tokenizer().decode(second[:6])
    assert stepper.asked[-1] == [1]


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    tokens = _ids("é!")
    assert len(tokens) == 3
    pieces = [step[0] for step in _run([tokens], SamplingConfig(3))[1]]
    assert [p.text for p in pieces] == ["", "é", "!"] and pieces[-1].finish == LENGTH


@torch.inference_mode()
def _argmax_continuation(model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    """The model alone, one prompt, no cache, no padding: the reference for the batched, cached loop."""
    ids = list(ids)
    for _ in range(count):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-count:]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_equals_each_prompt_decoded_alone_without_cache(tiny_model_dir, family: str) -> None:
    loaded = load_model(str(tiny_model_dir(family)))
    prompts = [encode(loaded.tokenizer, p, special=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    stepper = LocalStepper(loaded.model)
    states, _ = stepper.start(prompts)
    alone = LocalRepresenter(loaded.model)
    for row, prompt in enumerate(prompts):  # f(x) is the last block's output at each row's last real position
        torch.testing.assert_close(states[row], alone.forward([prompt])[0][0][-1], atol=1e-4, rtol=1e-4)
    done = complete(LocalStepper(loaded.model), prompts, model_policy, SamplingConfig(8), None, loaded.tokenizer)
    assert [c.tokens for c in done] == [_argmax_continuation(loaded.model, p, 8) for p in prompts]
    assert {c.finish for c in done} == {LENGTH}


@torch.inference_mode()
def test_a_plugged_lora_model_steps_with_its_adapter(tiny_model_dir) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B ≠ 0: it changes logits
    plugged = get_peft_model(loaded.model, lora).eval()
    prompt = encode(loaded.tokenizer, PROMPTS[0], special=True)
    _, log_probs = LocalStepper(plugged).start([prompt])
    expected = torch.log_softmax(plugged(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)
    torch.testing.assert_close(log_probs[0], expected, atol=1e-5, rtol=1e-5)
    with plugged.disable_adapter():
        assert not torch.allclose(plugged(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1), expected)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


def _sampled(llama, sampling: SamplingConfig, prompts: Sequence[str] = PROMPTS[:1]) -> list[list[int]]:
    ids = [encode(llama.tokenizer, p, special=True) for p in prompts]
    return [c.tokens for c in complete(LocalStepper(llama.model), ids, model_policy, sampling, None, llama.tokenizer)]


def test_sampling_follows_the_seed_and_a_tiny_top_p_is_greedy(llama) -> None:
    hot = SamplingConfig(10, temperature=1.5, seed=3)
    assert _sampled(llama, hot) == _sampled(llama, hot)
    assert _sampled(llama, hot) != _sampled(llama, SamplingConfig(10, temperature=1.5, seed=4))
    assert _sampled(llama, SamplingConfig(10, temperature=1.5, top_p=1e-6, seed=3)) == _sampled(
        llama, SamplingConfig(10)
    )
    # A row's draws are its own: in a batch it gets what it gets alone.
    assert _sampled(llama, hot, PROMPTS)[0] == _sampled(llama, hot)[0]


@pytest.mark.parametrize(
    "sampling, message",
    [
        (SamplingConfig(0), "max_new_tokens must be in"),
        (SamplingConfig(4, temperature=float("nan")), "temperature must be in"),
        (SamplingConfig(4, top_p=0.0), "top_p must be in (0, 1]"),
        (SamplingConfig(4, stop=("a",) * 5), "at most 4"),
        (SamplingConfig(4, stop=("",)), "1..64 characters"),
    ],
)
def test_bad_sampling_settings_are_refused(sampling: SamplingConfig, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        sampling.check()


def _random_pema_bundle(head_dir: Path, out: Path, training: dict | None = None) -> Path:
    """An untrained adapter with random decoders (trained ones start at zero): PEMA visibly moves the tokens."""
    config = PemaConfig(rank=4, gate_width=0, length_predictor=False, lambda_max=0.9)
    torch.manual_seed(0)
    adapter = PemaAdapter(Head.load(head_dir).weight.shape[1], config.rank)
    for decoder in (adapter.B_rct, adapter.B_pd):
        torch.nn.init.normal_(decoder.weight, std=4.0)
    out.mkdir()
    save_pema(adapter, config, out)
    head_manifest = read_manifest(head_dir)
    write_manifest(
        out,
        {
            "method": PEMA,
            "emulator": HEAD_ARTIFACT,
            "base_fingerprint": head_manifest["base_fingerprint"],
            "architecture": head_manifest.get("architecture", ""),
            "training": training or {},
        },
    )
    return out


def _tokens_and_text(pieces) -> tuple[list[int], str]:
    return [p.token for p in pieces if p.token is not None], "".join(p.text for p in pieces)


def test_the_same_seed_gives_the_same_pema_text_locally_on_the_owner_and_over_represent(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    prompt, planned = "Review: great film\nSentiment:", 4
    sampling = SamplingConfig(8, temperature=1.0, top_p=0.9, seed=11)
    loaded = owner.service.loaded
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
        bundle = _random_pema_bundle(tmp_path / "head", tmp_path / "pema")
        pushed = push_adapter(remote, bundle, show_progress=False)
        remote_pieces = list(generate_remote_pema(remote, bundle, tmp_path / "head", prompt, sampling, planned))
        request = pb.GenerateRequest(
            adapter_id=pushed.adapter_id,
            prompt=prompt,
            max_new_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=11,
            planned_length=planned,
        )
        events = list(remote.generate(request))
    adapter, config = load_pema(bundle)
    policy = pema_policy(adapter, Head.load(tmp_path / "head"), config, 8, [planned] if planned else None)
    ids = encode(loaded.tokenizer, prompt, special=True)
    local = list(
        stream(LocalStepper(loaded.model), ids, policy, sampling, loaded.tokenizer.eos_token_id, loaded.tokenizer)
    )

    assert _tokens_and_text(local) == _tokens_and_text(remote_pieces)
    owner_tokens = [e.token_id for e in events if not e.done]
    assert (owner_tokens, "".join(e.text for e in events)) == _tokens_and_text(local)
    assert events[-1].done and events[-1].finish_reason == local[-1].finish
    # Both the adapter and the sampling matter: the plain model with the same seed, or PEMA greedy, differ.
    plain = list(stream(LocalStepper(loaded.model), ids, model_policy, sampling, None, loaded.tokenizer))
    greedy = list(stream(LocalStepper(loaded.model), ids, policy, SamplingConfig(8), None, loaded.tokenizer))
    assert owner_tokens not in (_tokens_and_text(plain)[0], _tokens_and_text(greedy)[0][: len(owner_tokens)])


def test_generate_over_grpc_honours_stop_strings_and_names_the_finish_reason(owner: InProcessOwner) -> None:
    prompt = "the movie was"
    with owner.remote() as remote:
        events = list(remote.generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=12)))
        text = "".join(e.text for e in events)
        assert events[-1].done and events[-1].finish_reason in (LENGTH, EOS)
        stop = next(text[k : k + 2] for k in range(1, len(text) - 1) if "\ufffd" not in text[k : k + 2])
        request = pb.GenerateRequest(prompt=prompt, max_new_tokens=12, stop=[stop, "never in this text"])
        stopped = list(remote.generate(request))
    assert "".join(e.text for e in stopped) == text[: text.find(stop)]
    assert stopped[-1].finish_reason == STOP


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": -0.1}, "top_p must be in (0, 1]"),
        ({"stop": ["a"] * 5}, "5 stop strings; at most 4"),
        ({"stop": ["x" * 65]}, "each stop string must have 1..64 characters"),
        ({"temperature": float("inf")}, "temperature must be in 0..10"),
    ],
)
def test_bad_sampling_requests_are_invalid_arguments(owner: InProcessOwner, fields: dict, message: str) -> None:
    with owner.remote() as remote, pytest.raises(RemoteError) as caught:
        list(remote.generate(pb.GenerateRequest(prompt="the movie", max_new_tokens=2, **fields)))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(caught.value)


def test_a_hybrid_adapter_reads_the_emulator_it_learned_on_while_the_owner_gives_p_lm(
    owner: InProcessOwner, tiny_emulator: Path, tmp_path: Path
) -> None:
    prompt, planned = "Review: great film\nSentiment:", 4
    sampling = SamplingConfig(8, temperature=1.0, top_p=0.9, seed=5)
    loaded = owner.service.loaded
    emulator, _, manifest = load_emulator(tiny_emulator)
    ids = encode(loaded.tokenizer, prompt, special=True)
    # The pair: states from the reader (through the transform), log P_LM from the model.
    paired = ReadingStepper(LocalStepper(loaded.model), LocalStepper(emulator), lambda states: 2 * states)
    states, log_probs = paired.start([ids])
    torch.testing.assert_close(states, 2 * LocalStepper(emulator).start([ids])[0])
    torch.testing.assert_close(log_probs, LocalStepper(loaded.model).start([ids])[1])
    hybrid = {"memory_source": f"emulator {manifest['id']}", "memory_bridge": False}
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
        head = tmp_path / "head"
        bundle = _random_pema_bundle(head, tmp_path / "pema", hybrid)
        read = list(generate_remote_pema(remote, bundle, head, prompt, sampling, planned, emulator_dir=tiny_emulator))
        on_full = list(generate_remote_pema(remote, bundle, head, prompt, sampling, planned))
        remote_memory = _random_pema_bundle(head, tmp_path / "remote-pema", {"memory_source": "owner"})
        with pytest.raises(ValueError, match="trained on a memory from owner"):
            generate_remote_pema(remote, remote_memory, head, prompt, sampling, planned, emulator_dir=tiny_emulator)
    adapter, config = load_pema(bundle)
    policy = pema_policy(adapter, Head.load(head), config, 8, [planned])
    reading = ReadingStepper(LocalStepper(loaded.model), LocalStepper(emulator))
    local = list(stream(reading, ids, policy, sampling, loaded.tokenizer.eos_token_id, loaded.tokenizer))
    assert _tokens_and_text(read) == _tokens_and_text(local)
    assert _tokens_and_text(read)[0] != _tokens_and_text(on_full)[0]  # which states PEMA reads changes the text
