"""Delivery "proxy" of a pushed LoRA adapter (owner/adapters/delivery.py): Evaluate scores and Generate decodes like
an in-process `ProxyTuned(full, emulator+adapter, emulator)`, the KV-cached `ProxyStepper` follows full-sequence
logits, and what proxy-tuning cannot run is refused with a precise status."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessOwner, sentiment_examples, write_jsonl
from peft import LoraConfig, get_peft_model

from offsite.client.cli import main as client_main
from offsite.client.connection import RemoteError
from offsite.client.evaluation import evaluate_remote
from offsite.client.pull import pull_emulator, pull_head
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import EVERY_BLOCK, TrainConfig
from offsite.common.adapter_format import BLOCK_INDICES_FIELD, EMULATOR_INDICES, FULL, PEMA
from offsite.common.contract import ADAPTER_CONFIG_FILE, HEAD_ARTIFACT, PLUG_IN, PROXY
from offsite.common.emulator_loading import load_emulator, plug_into_emulator
from offsite.common.examples import encode
from offsite.common.generation.steppers import LocalStepper, ProxyStepper
from offsite.common.manifest import read_manifest, write_manifest
from offsite.common.model_loading import load_model
from offsite.common.pema.adapter import PemaAdapter
from offsite.common.pema.bundle import save_pema
from offsite.common.pema.config import PemaConfig
from offsite.common.pema.head import Head
from offsite.common.proxy_tuning import ProxyTuned
from offsite.common.rpc import pb
from offsite.common.scoring import evaluate, logits_at, score_examples
from offsite.owner.adapters.validation import AdapterRejected, validate_adapter
from offsite.owner.export import ExportRefused, merged_model

EMULATOR = "uniform-1-2-1"
PROMPT = "Review: great film\nSentiment:"
PROMPTS = ["the movie", "a dull, boring film with a terrible", "Review:"]  # different lengths: left padding


@dataclass
class Pushed:
    adapter_id: str
    adapter: Path
    emulator: Path  # the pulled bundle it was trained on


def _train_and_push(owner: InProcessOwner, tmp_path: Path, method: str, train_blocks: str = "all") -> Pushed:
    if not (tmp_path / "emulator").is_dir():
        with owner.remote() as remote:
            pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    config = TrainConfig(method=method, epochs=1, learning_rate=1e-2, train_blocks=train_blocks)
    out = tmp_path / f"{method}-{train_blocks}"
    train_adapter(tmp_path / "emulator", sentiment_examples(16), config, out, show_progress=False)
    with owner.remote() as remote:
        adapter_id = push_adapter(remote, out, show_progress=False).adapter_id
    return Pushed(adapter_id, out, tmp_path / "emulator")


@pytest.fixture
def pushed(owner: InProcessOwner, tmp_path: Path) -> Pushed:
    return _train_and_push(owner, tmp_path, "lora")


def in_process_proxy(owner: InProcessOwner, pushed: Pushed) -> ProxyTuned:
    emulator, _, manifest = load_emulator(pushed.emulator, owner.service.public_key)
    tuned = plug_into_emulator(copy.deepcopy(emulator), manifest, pushed.adapter)
    return ProxyTuned(owner.service.loaded.model, tuned, emulator)


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The next-token logits after `ids`, from a forward over all of them: no KV cache."""
    batch = torch.tensor([ids])
    return logits_at(model, batch, torch.ones_like(batch), torch.tensor([0]), torch.tensor([len(ids) - 1]))[0]


def greedy_uncached(model: torch.nn.Module, prompt: list[int], steps: int, eos_id: int | None) -> list[int]:
    tokens: list[int] = []
    for _ in range(steps):
        token = int(last_logits(model, prompt + tokens).argmax())
        if token == eos_id:
            break
        tokens.append(token)
    return tokens


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_by_proxy_scores_like_an_in_process_proxy_tuned_model(
    owner: InProcessOwner, pushed: Pushed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = sentiment_examples(12, offset=3)
    proxy = in_process_proxy(owner, pushed)
    tokenizer = owner.service.loaded.tokenizer
    with owner.remote() as remote:
        plugged = evaluate_remote(remote, examples, pushed.adapter_id, show_progress=False)  # cached first
        proxied = evaluate_remote(remote, examples, pushed.adapter_id, show_progress=False, delivery=PROXY)
        # One example per request: each one's log-likelihood, as an in-process proxy scores it.
        singles = [
            evaluate_remote(remote, [e], pushed.adapter_id, show_progress=False, delivery=PROXY) for e in examples[:3]
        ]
    local = evaluate(proxy, tokenizer, examples)
    assert (plugged["delivery"], proxied["delivery"]) == (PLUG_IN, PROXY)
    assert proxied["loss"] == pytest.approx(local.loss, abs=1e-4)
    assert proxied["correct"] == local.correct and proxied["accuracy"] == pytest.approx(local.accuracy)
    for single, score in zip(singles, score_examples(proxy, tokenizer, examples[:3]), strict=True):
        assert -single["loss"] * single["tokens"] == pytest.approx(score.logprobs[score.gold], abs=1e-4)
    assert abs(proxied["loss"] - plugged["loss"]) > 1e-3, "the two deliveries are cached apart"

    data = write_jsonl(examples, tmp_path / "dev.jsonl")
    server = ["--server", owner.address, "--token", owner.token]
    client_main(["eval", *server, "--yes", "--data", str(data), "--adapter-id", pushed.adapter_id, "--json"])
    assert last_json(capsys)["delivery"] == PLUG_IN
    client_main(["eval", *server, "--yes", "--data", str(data), "--adapter-id", pushed.adapter_id, "--delivery", PROXY])
    shown = capsys.readouterr().out
    assert f"owner ({PROXY})" in shown and f"loss {proxied['loss']:.4f}" in shown


def test_greedy_generate_by_proxy_follows_full_sequence_proxy_tuned_logits(
    owner: InProcessOwner, pushed: Pushed, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = 6
    with owner.remote() as remote:
        request = pb.GenerateRequest(adapter_id=pushed.adapter_id, prompt=PROMPT, max_new_tokens=steps, delivery=PROXY)
        served = [e.token_id for e in remote.generate(request) if not e.done]
    tokenizer = owner.service.loaded.tokenizer
    prompt = encode(tokenizer, PROMPT, special=True)
    expected = greedy_uncached(in_process_proxy(owner, pushed), prompt, steps, tokenizer.eos_token_id)
    assert served and served == expected
    assert expected != greedy_uncached(owner.service.loaded.model, prompt, steps, tokenizer.eos_token_id)

    arguments = ["--server", owner.address, "--token", owner.token, "--adapter-id", pushed.adapter_id]
    client_main(
        ["generate", *arguments, "--prompt", PROMPT, "--max-new-tokens", str(steps), "--delivery", PROXY, "--json"]
    )
    result = last_json(capsys)
    assert result["delivery"] == PROXY and result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


@torch.inference_mode()
def test_the_proxy_stepper_keeps_a_cache_per_member_and_matches_full_sequence_logits(
    tiny_model_dir, tiny_emulator: Path
) -> None:
    full = load_model(str(tiny_model_dir("llama"))).model
    emulator, tokenizer, _ = load_emulator(tiny_emulator)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B ≠ 0: it steers
    proxy = ProxyTuned(full, get_peft_model(copy.deepcopy(emulator), lora).eval(), emulator)
    sequences = [encode(tokenizer, p, special=True) for p in PROMPTS]

    def follows(rows: list[int], log_probs: torch.Tensor) -> None:
        for k, row in enumerate(rows):
            expected = torch.log_softmax(last_logits(proxy, sequences[row]), dim=-1)
            torch.testing.assert_close(log_probs[k], expected, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(log_probs[k], torch.log_softmax(last_logits(full, sequences[row]), -1), atol=1e-3)

    stepper = ProxyStepper(proxy)
    states, log_probs = stepper.start(sequences)
    torch.testing.assert_close(states, LocalStepper(full).start(sequences)[0])  # f(x) is the full model's
    rows = [0, 1, 2]
    follows(rows, log_probs)
    for step in range(3):
        kept = [0, 2] if step == 1 else rows  # row 1 ends: a row left out is never named again
        tokens = [int(log_probs[rows.index(row)].argmax()) for row in kept]
        for row, token in zip(kept, tokens, strict=True):
            sequences[row].append(token)
        rows = kept
        _, log_probs = stepper.advance(rows, tokens)
        follows(rows, log_probs)


def _pema_bundle(owner: InProcessOwner, tmp_path: Path) -> Path:
    """An untrained PEMA adapter: enough to be stored."""
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
    config = PemaConfig(rank=4, gate_width=0, length_predictor=False)
    out = tmp_path / "pema"
    out.mkdir()
    save_pema(PemaAdapter(Head.load(tmp_path / "head").weight.shape[1], config.rank), config, out)
    head = read_manifest(tmp_path / "head")
    body = {"method": PEMA, "emulator": HEAD_ARTIFACT, "base_fingerprint": head["base_fingerprint"]}
    write_manifest(out, {**body, "architecture": head.get("architecture", ""), "training": {}})
    return out


def refusals(owner: InProcessOwner, adapter_id: str, delivery: str) -> list[RemoteError]:
    """What an Evaluate and a Generate with this adapter and delivery are refused with."""
    request = pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT, max_new_tokens=2, delivery=delivery)
    with owner.remote() as remote:
        with pytest.raises(RemoteError) as evaluating:
            evaluate_remote(remote, sentiment_examples(2), adapter_id, show_progress=False, delivery=delivery)
        with pytest.raises(RemoteError) as generating:
            list(remote.generate(request))
    return [evaluating.value, generating.value]


def test_proxy_refuses_what_it_cannot_run(owner: InProcessOwner, tmp_path: Path) -> None:
    """A PEMA or full-block adapter is a failed precondition; an unknown delivery, or a proxy of no adapter, invalid."""
    with owner.remote() as remote:
        pema = push_adapter(remote, _pema_bundle(owner, tmp_path), show_progress=False).adapter_id
    full = _train_and_push(owner, tmp_path, FULL).adapter_id
    for adapter_id, method in ((pema, PEMA), (full, FULL)):
        for error in refusals(owner, adapter_id, PROXY):
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"needs a lora adapter; {adapter_id} is a {method} adapter" in str(error)
    for adapter_id, delivery, message in (
        (full, "sideways", "delivery must be one of plug_in, proxy"),
        ("", PROXY, "give adapter_id"),
    ):
        for error in refusals(owner, adapter_id, delivery):
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(error)


def test_proxy_refuses_an_adapter_whose_emulator_the_store_lacks(owner: InProcessOwner, pushed: Pushed) -> None:
    shutil.rmtree(owner.store.emulator_dir(owner.service.fingerprint, EMULATOR))
    for error in refusals(owner, pushed.adapter_id, PROXY):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"emulator {EMULATOR}" in str(error) and "no longer holds it" in str(error)
    with owner.remote() as remote:  # plugging in needs no emulator
        assert evaluate_remote(remote, sentiment_examples(2), pushed.adapter_id, show_progress=False)["examples"] == 2


def test_an_adapter_on_every_emulator_block_is_served_by_proxy_and_never_plugged_in(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    """LoRA on the emulator's compressed middle too: keyed by emulator blocks, validated, scored by proxy like an
    in-process ProxyTuned, and refused (not silently misapplied) for plug-in and export."""
    every = _train_and_push(owner, tmp_path, "lora", EVERY_BLOCK)
    emulator_manifest = read_manifest(every.emulator)
    depth = len(emulator_manifest["block_map"])
    assert depth > len(emulator_manifest["adapter_blocks"]["emulator"]), "the emulator has middle blocks"
    assert read_manifest(every.adapter)[BLOCK_INDICES_FIELD] == EMULATOR_INDICES
    config = json.loads((every.adapter / ADAPTER_CONFIG_FILE).read_text())
    assert config["layers_to_transform"] == list(range(depth))

    examples = sentiment_examples(8, offset=3)
    proxy = in_process_proxy(owner, every)
    lora_blocks = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in proxy.expert.named_modules() if "lora_A" in n}
    assert lora_blocks == set(range(depth))
    with owner.remote() as remote:
        proxied = evaluate_remote(remote, examples, every.adapter_id, show_progress=False, delivery=PROXY)
    assert proxied["loss"] == pytest.approx(evaluate(proxy, owner.service.loaded.tokenizer, examples).loss, abs=1e-4)
    for error in refusals(owner, every.adapter_id, PLUG_IN):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "every emulator block" in str(error) and f"delivery {PROXY}" in str(error)
    with pytest.raises(ExportRefused, match="fits the emulator only"):
        merged_model(owner.service.loaded.model, every.adapter, "lora")


def test_validation_holds_an_emulator_indexed_adapter_to_the_emulator_blocks(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    every = _train_and_push(owner, tmp_path, "lora", EVERY_BLOCK)
    emulator_manifest = read_manifest(every.emulator)
    full, fingerprint = owner.service.loaded.model, owner.service.fingerprint
    assert validate_adapter(every.adapter, full, emulator_manifest, fingerprint).method == "lora"
    # Read as full-model indexed, its middle-block keys fall outside the adapter blocks.
    body = read_manifest(every.adapter)
    write_manifest(every.adapter, {k: v for k, v in body.items() if k not in (BLOCK_INDICES_FIELD, "files")})
    with pytest.raises(AdapterRejected, match="subset of the adapter blocks"):
        validate_adapter(every.adapter, full, emulator_manifest, fingerprint)
    write_manifest(every.adapter, {**body, BLOCK_INDICES_FIELD: "sideways"})
    with pytest.raises(AdapterRejected, match="block_indices must be 'full' or 'emulator'"):
        validate_adapter(every.adapter, full, emulator_manifest, fingerprint)
    full_blocks = tmp_path / "full-blocks"
    train_adapter(
        every.emulator, sentiment_examples(4), TrainConfig(method=FULL, epochs=1), full_blocks, show_progress=False
    )
    write_manifest(full_blocks, {**read_manifest(full_blocks), BLOCK_INDICES_FIELD: EMULATOR_INDICES})
    with pytest.raises(AdapterRejected, match="only a lora adapter may be indexed by the emulator's blocks"):
        validate_adapter(full_blocks, full, emulator_manifest, fingerprint)


def test_every_block_training_refuses_a_full_block_adapter(tmp_path: Path, tiny_emulator: Path) -> None:
    config = TrainConfig(method=FULL, epochs=1, train_blocks=EVERY_BLOCK)
    with pytest.raises(ValueError, match="trains LoRA"):
        train_adapter(tiny_emulator, sentiment_examples(4), config, tmp_path / "out", show_progress=False)
