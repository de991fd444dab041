"""Fixtures: tiny models on disk, and an owner served in-process on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

from offsite.client.config import CONFIG_ENVIRONMENT, ENVIRONMENT, HOME_ENVIRONMENT  # noqa: E402
from offsite.client.connection import Remote  # noqa: E402
from offsite.common.examples import Example  # noqa: E402
from offsite.common.model_loading import fingerprint, load_model  # noqa: E402
from offsite.common.signing import load_or_create_private_key  # noqa: E402
from offsite.owner.emulator import EmulatorSpec, build_emulator  # noqa: E402
from offsite.owner.server import start_server  # noqa: E402
from offsite.owner.service import OwnerService  # noqa: E402
from offsite.owner.store import Store  # noqa: E402

TINY_LAYOUT = "1-2-1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's client config (servers, pinned owner keys) lives in its own directory, never in the real home,
    and no OFFSITE_* client variable of the shell running the tests leaks in."""
    home = tmp_path / "client-home"
    monkeypatch.setenv(HOME_ENVIRONMENT, str(home))
    for variable in (CONFIG_ENVIRONMENT, *ENVIRONMENT.values()):
        monkeypatch.delenv(variable, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = tiny_models.save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_emulator(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed `uniform` emulator bundle of the tiny llama, built once per session (tests only read it)."""
    root = tmp_path_factory.mktemp("tiny-emulator")
    loaded = load_model(str(tiny_model_dir("llama")))
    key = load_or_create_private_key(root / "key.pem")
    spec = EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")
    build_emulator(loaded.model, loaded.tokenizer, spec, root / "emulator", key, fingerprint(loaded.model), "llama")
    return root / "emulator"


def sentiment_examples(count: int, offset: int = 0) -> list[Example]:
    words = ["great", "dull", "wonderful", "terrible", "delight", "waste"]
    return [
        Example(
            prompt=f"Review: {words[(i + offset) % 6]} film {i}\nSentiment:",
            completion=" positive" if (i + offset) % 2 == 0 else " negative",
            choices=(" negative", " positive"),
        )
        for i in range(count)
    ]


def write_jsonl(examples: list[Example], path: Path) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "completion": e.completion, "choices": list(e.choices)}) + "\n"
            for e in examples
        )
    )
    return path


@dataclass
class InProcessOwner:
    service: OwnerService
    store: Store
    address: str
    token: str
    server: grpc.Server

    def remote(self, token: str | None = None) -> Remote:
        return Remote(self.address, token or self.token)


@pytest.fixture
def owner(tiny_model_dir, tmp_path: Path) -> Iterator[InProcessOwner]:
    store = Store(tmp_path / "store")
    token = store.add_tenant("alice")
    service = OwnerService(
        load_model(str(tiny_model_dir("llama"))),
        store,
        [EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")],
        max_adapter_bytes=2 * 1024 * 1024,
    )
    server, port = start_server(service, store, "127.0.0.1:0")
    yield InProcessOwner(service, store, f"127.0.0.1:{port}", token, server)
    server.stop(None)
    store.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> tuple[int, dict, str]:
    """Runs `offsite ...` with --json; returns exit code, the JSON result, and stderr."""
    completed = subprocess.run(
        [sys.executable, "-m", "offsite.client", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    lines = completed.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if check and completed.returncode != 0:
        raise AssertionError(f"offsite {' '.join(args)} failed: {completed.stderr[-2000:]}")
    return completed.returncode, result, completed.stderr


@pytest.fixture
def daemon(tmp_path: Path):
    """Starts `offsite-owner serve` as a subprocess on a free loopback port; yields (address, token)."""
    processes: list[subprocess.Popen] = []

    def start(model_dir: Path, layout: str = TINY_LAYOUT) -> tuple[str, str]:
        store = tmp_path / f"store-{len(processes)}"
        token = Store(store).add_tenant("alice")
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "offsite.owner",
                "serve",
                "--model",
                str(model_dir),
                "--store",
                str(store),
                "--listen",
                f"127.0.0.1:{port}",
                "--emulator",
                f"uniform:{layout}",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        line = process.stdout.readline()
        while not line.startswith("{") and time.monotonic() < deadline and line:
            line = process.stdout.readline()
        if not line.startswith("{"):
            raise AssertionError(f"daemon did not start: {process.stderr.read() if process.stderr else ''}")
        return json.loads(line)["address"], token

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)
