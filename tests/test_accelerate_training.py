"""Training on accelerate (issue 15): under `accelerate launch --num_processes 2 --cpu`, `offsite train` trains the
adapter and `offsite-owner build-emulator --method distill` the emulator that a plain one-process run trains, on the
same global batches, and each writes and reports its result once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT, free_port, sentiment_examples, write_jsonl
from safetensors.torch import load_file
from transformers.utils import SAFE_WEIGHTS_NAME

from offsite.common.contract import ADAPTER_WEIGHTS_FILE


@pytest.fixture
def emulator(tiny_emulator: Path) -> Path:
    return tiny_emulator


def _launch() -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    launch += ["--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no"]
    return [*launch, "--dynamo_backend", "no", "-m"]


def _train(emulator: Path, data: Path, out: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    # 13 examples, batch 4: the last batch of each epoch leaves one rank without an example of its own
    arguments = ["train", "--emulator", str(emulator), "--data", str(data), "--out", str(out), "--json"]
    arguments += ["--batch-size", "4", "--epochs", "2", "--lora-dropout", "0", "--lr", "5e-3"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "offsite.client", *arguments], capture_output=True, text=True, env=environment, timeout=300
    )


def test_two_processes_train_the_adapter_one_process_trains(emulator: Path, tmp_path: Path) -> None:
    data = write_jsonl(sentiment_examples(13), tmp_path / "train.jsonl")
    single = _train(emulator, data, tmp_path / "single", [sys.executable, "-m"])
    assert single.returncode == 0, single.stderr
    double = _train(emulator, data, tmp_path / "double", _launch())
    assert double.returncode == 0, double.stderr

    reports = [json.loads(line) for line in double.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports
    one = json.loads(single.stdout.splitlines()[-1])
    assert reports[0]["steps"] == one["steps"] == 8
    assert reports[0]["parameters"] == one["parameters"] > 0
    assert reports[0]["last_loss"] == pytest.approx(one["last_loss"], rel=1e-4)

    trained = load_file(tmp_path / "double" / ADAPTER_WEIGHTS_FILE)
    reference = load_file(tmp_path / "single" / ADAPTER_WEIGHTS_FILE)
    assert trained.keys() == reference.keys()
    moved = [name for name in reference if "lora_B" in name and reference[name].abs().max() > 1e-3]
    assert moved  # the adapters learnt something, so agreeing is not agreeing on zeros
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not list(tmp_path.glob("double*.partial*"))


def _distill(model: Path, text: Path, store: Path, out: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    arguments = ["build-emulator", "--model", str(model), "--method", "distill", "--layout", TINY_LAYOUT]
    arguments += ["--steps", "6", "--data", str(text), "--store", str(store), "--out", str(out), "--json"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "offsite.owner", *arguments], capture_output=True, text=True, env=environment, timeout=300
    )


def test_two_processes_distill_the_emulator_one_process_distills(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    text = tmp_path / "public.txt"
    text.write_text(" ".join(f"the river {i} runs past the mill number {i * 7 % 13} into the sea." for i in range(400)))
    single = _distill(model, text, tmp_path / "store", tmp_path / "single", [sys.executable, "-m"])
    assert single.returncode == 0, single.stderr
    double = _distill(model, text, tmp_path / "store", tmp_path / "double", _launch())
    assert double.returncode == 0, double.stderr

    reports = [json.loads(line) for line in double.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone writes and reports
    one = json.loads(single.stdout.splitlines()[-1])
    assert reports[0]["block_map"] == one["block_map"] and reports[0]["parameters"] == one["parameters"]
    params = [json.loads((tmp_path / run / "offsite.json").read_text())["params"] for run in ("single", "double")]
    for field in ("nmse_first", "nmse_last", "heldout_nmse_after", "heldout_perplexity_after", "best_step"):
        assert params[1][field] == pytest.approx(params[0][field], rel=1e-4), field
    distilled = load_file(tmp_path / "double" / SAFE_WEIGHTS_NAME)
    reference = load_file(tmp_path / "single" / SAFE_WEIGHTS_NAME)
    assert distilled.keys() == reference.keys()
    # distillation moved every kept middle block off the full model's copy: agreeing is not agreeing on the start
    full = load_file(model / SAFE_WEIGHTS_NAME)
    middle = [i for i in range(len(one["block_map"])) if i not in one["adapter_blocks"]["emulator"]]
    assert middle
    for position in middle:
        name = f"model.layers.{position}.mlp.down_proj.weight"
        copied = full[f"model.layers.{one['block_map'][position]}.mlp.down_proj.weight"]
        assert not torch.allclose(reference[name], copied, atol=1e-6), name
    for name, tensor in reference.items():
        torch.testing.assert_close(distilled[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not list(tmp_path.glob("double*.partial*")) and not list(tmp_path.glob("double*.work"))
