"""`offsite-owner serve` as a subprocess, driven by the `offsite` CLI: pull → train → push → eval → generate."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli, sentiment_examples, write_jsonl

from offsite.common.examples import read_jsonl
from offsite.common.model_loading import load_model
from offsite.common.scoring import evaluate
from offsite.owner.adapters.plugin import plug


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_workflow_through_the_cli(family: str, tiny_model_dir, daemon, tmp_path: Path) -> None:
    address, token = daemon(tiny_model_dir(family))
    env = {"OFFSITE_TOKEN": token}
    train = write_jsonl(sentiment_examples(24), tmp_path / "train.jsonl")
    dev = write_jsonl(sentiment_examples(10, offset=1), tmp_path / "dev.jsonl")
    emulator, adapter = tmp_path / "emulator", tmp_path / "adapter"

    _, pulled, _ = cli("pull", "--server", address, "--out", str(emulator), env=env)
    assert pulled["emulator"] == "uniform-1-2-1" and pulled["block_map"] == [0, 1, 4, 5]
    key = pulled["owner_public_key"]
    _, trained, _ = cli(
        "train",
        "--emulator",
        str(emulator),
        "--data",
        str(train),
        "--out",
        str(adapter),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--owner-key",
        key,
    )
    assert trained["method"] == "lora" and trained["steps"] == 6 and trained["last_loss"] < trained["first_loss"]
    _, local, _ = cli("eval", "--emulator", str(emulator), "--adapter", str(adapter), "--data", str(dev))
    assert local["examples"] == 10 and local["where"] == "local emulator"
    _, pushed, _ = cli("push", "--server", address, "--adapter", str(adapter), env=env)
    code, refused, _ = cli("eval", "--server", address, "--data", str(dev), env=env, check=False)
    assert code == 2 and "--yes" in refused["error"], "the owner sees the examples: the CLI asks first"
    on_owner = ["eval", "--server", address, "--yes", "--data", str(dev)]
    _, remote, _ = cli(*on_owner, "--adapter-id", pushed["adapter_id"], env=env)
    _, zero_shot, _ = cli(*on_owner, env=env)
    assert remote["loss"] != zero_shot["loss"]

    # The owner's plug-in through the server equals an in-process plug-in of the same adapter.
    loaded = load_model(str(tiny_model_dir(family)))
    in_process = evaluate(plug(loaded.model, adapter, "lora"), loaded.tokenizer, read_jsonl(dev))
    assert abs(remote["loss"] - in_process.loss) < 1e-4

    _, generated, _ = cli(
        "generate",
        "--server",
        address,
        "--adapter-id",
        pushed["adapter_id"],
        "--prompt",
        "Review: great film\nSentiment:",
        "--max-new-tokens",
        "4",
        env=env,
    )
    assert generated["ok"] and isinstance(generated["text"], str)
    _, listed, _ = cli("adapters", "list", "--server", address, env=env)
    assert [a["adapter_id"] for a in listed["adapters"]] == [pushed["adapter_id"]]


def test_train_refuses_a_tampered_emulator(tiny_model_dir, daemon, tmp_path: Path) -> None:
    address, token = daemon(tiny_model_dir("llama"))
    emulator = tmp_path / "emulator"
    cli("pull", "--server", address, "--out", str(emulator), env={"OFFSITE_TOKEN": token})
    weights = emulator / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    train = write_jsonl(sentiment_examples(4), tmp_path / "train.jsonl")
    code, result, stderr = cli(
        "train", "--emulator", str(emulator), "--data", str(train), "--out", str(tmp_path / "adapter"), check=False
    )
    assert code != 0 and not (tmp_path / "adapter").exists()
    assert "model.safetensors" in result["error"] and "sha256 does not match" in result["error"]
    assert "model.safetensors" in stderr


def test_cli_explains_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": " y"}\n{"prompt": 3}\n')
    code, result, _ = cli(
        "train", "--emulator", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o"), check=False
    )
    assert code == 2 and "bad.jsonl:2" in result["error"] and "must be a string" in result["error"]
    code, result, _ = cli(
        "pull", "--server", "127.0.0.1:1", "--out", str(tmp_path / "e"), check=False, env={"OFFSITE_TOKEN": ""}
    )
    assert code == 2 and "no tenant token" in result["error"]


def test_pema_workflow_through_the_cli(tiny_model_dir, daemon, tmp_path: Path) -> None:
    """pull --head → memory build (owner, then hybrid) → train --method pema → push → generate two ways."""
    address, token = daemon(tiny_model_dir("llama"))
    env = {"OFFSITE_TOKEN": token}
    data = write_jsonl(sentiment_examples(12), tmp_path / "train.jsonl")
    head, emulator = tmp_path / "head", tmp_path / "emulator"
    cli("pull", "--server", address, "--head", "--out", str(head), env=env)
    cli("pull", "--server", address, "--out", str(emulator), env=env)
    memory_args = ["memory", "build", "--data", str(data), "--out", str(tmp_path / "memory")]
    code, refused, _ = cli(*memory_args, "--server", address, env=env, check=False)
    assert code == 2 and "--yes" in refused["error"], "the owner sees the token ids: the CLI asks first"
    _, built, stderr = cli(*memory_args, "--server", address, "--yes", "--head", str(head), env=env)
    assert built["rows"] > 12 and built["source"] == "owner" and "sending the token ids" in stderr
    _, hybrid, _ = cli(
        "memory", "build", "--emulator", str(emulator), "--data", str(data), "--out", str(tmp_path / "h")
    )
    assert hybrid["rows"] == built["rows"] and hybrid["source"].startswith("emulator")

    pema = ["--method", "pema", "--pema-rank", "8", "--epochs", "2"]
    _, trained, _ = cli(
        "train", *pema, "--memory", str(tmp_path / "memory"), "--head", str(head), "--out", str(tmp_path / "p")
    )
    assert trained["method"] == "pema" and trained["memory_rows"] == built["rows"]
    _, pushed, _ = cli("push", "--server", address, "--adapter", str(tmp_path / "p"), env=env)
    assert pushed["method"] == "pema"
    prompt = ["--prompt", "Review: great film 3\nSentiment:", "--max-new-tokens", "3", "--method", "pema"]
    prompt[:0] = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--stop", "\n\n"]  # sampled, both sides
    on_owner = ["generate", "--server", address, "--adapter-id", pushed["adapter_id"]]
    _, owner_side, _ = cli(*on_owner, *prompt, env=env)
    _, here, _ = cli(
        "generate", "--server", address, "--adapter", str(tmp_path / "p"), "--head", str(head), *prompt, env=env
    )
    assert (owner_side["text"], owner_side["finish_reason"]) == (here["text"], here["finish_reason"])
    code, wrong, _ = cli(*on_owner, *prompt[:-1], "lora", env=env, check=False)
    assert code == 2 and "is a pema adapter, not lora" in wrong["error"]
