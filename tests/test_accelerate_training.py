"""Client training on accelerate (issue 15): `accelerate launch --num_processes 2 --cpu offsite train` trains the
adapter a plain one-process run trains, on the same global batches, and writes and reports it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, sentiment_examples, write_jsonl
from safetensors.torch import load_file

from offsite.common.contract import ADAPTER_WEIGHTS_FILE


@pytest.fixture
def emulator(tiny_emulator: Path) -> Path:
    return tiny_emulator


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
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    launch += ["--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m"]
    double = _train(emulator, data, tmp_path / "double", launch)
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
