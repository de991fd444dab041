"""Privacy on the wire: every byte the data owner sends during pull → train → push, and during the PEMA hybrid, is
recorded by a client interceptor, and none of it carries a training example's text or a run of its token ids.

The control: a remote evaluation sends its examples to the owner by design, and the same detector finds them there,
so a silent detector cannot pass the test.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from conftest import InProcessOwner
from transformers import AutoTokenizer

from offsite.client.evaluation import evaluate_remote
from offsite.client.memory import build_memory_local, build_memory_remote
from offsite.client.pull import pull_emulator, pull_head
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.client.training.pema import train_pema_bundle
from offsite.common.examples import Example
from offsite.common.pema.config import PemaConfig
from offsite.common.rpc import pb_grpc

RUN = 4  # consecutive token ids that count as a leak


class Recorder(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Keeps the serialized bytes of every request message the client sends."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def _record(self, request: Any) -> None:
        self.sent += request.SerializeToString()

    def _records(self, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self._record(request)
            yield request

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._record(request)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._record(request)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(details, self._records(requests))

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(details, self._records(requests))


def _private_examples() -> list[Example]:
    pets = ["marmalade", "biscuit", "pepperoni", "quillon", "zephyrine", "tamsworth"]
    return [
        Example(
            prompt=f"Diary {i}: my cat {pets[i % 6]} hid the spare key under flowerpot {i * 7}\nMood:",
            completion=" positive" if i % 2 else " negative",
            choices=(" negative", " positive"),
        )
        for i in range(16)
    ]


def _leaks(sent: bytes, examples: list[Example], tokenizer: Any) -> list[str]:
    found = []
    for example in examples:
        for text in (example.prompt, example.prompt.split(":", 1)[1].strip()):
            if text.encode() in sent:
                found.append(f"text {text!r}")
        ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - RUN + 1):
            window = ids[start : start + RUN]
            packings = {
                "int32": struct.pack(f"<{RUN}i", *window),
                "int64": struct.pack(f"<{RUN}q", *window),
                "varint": b"".join(_varint(i) for i in window),
            }
            found += [f"token ids {window} as {kind}" for kind, packed in packings.items() if packed in sent]
    return found


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_pull_train_push_sends_no_example_text_or_token_ids(owner: InProcessOwner, tmp_path: Path) -> None:
    examples = _private_examples()
    recorder = Recorder()
    with owner.remote() as remote:
        remote.stub = pb_grpc.ModelOwnerStub(grpc.intercept_channel(remote.channel, recorder))
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
        adapter = tmp_path / "adapter"
        config = TrainConfig(epochs=1, learning_rate=1e-2)
        train_adapter(tmp_path / "emulator", examples, config, adapter, show_progress=False)
        push_adapter(remote, adapter, show_progress=False)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "emulator")
        assert len(recorder.sent) > (adapter / "adapter_model.safetensors").stat().st_size, "the push was recorded"
        assert _leaks(bytes(recorder.sent), examples, tokenizer) == []

        control = Recorder()
        remote.stub = pb_grpc.ModelOwnerStub(grpc.intercept_channel(remote.channel, control))
        evaluate_remote(remote, examples[:2], show_progress=False)
    leaks = _leaks(bytes(control.sent), examples[:2], tokenizer)
    assert any(leak.startswith("text") for leak in leaks), "the detector finds text that is sent"
    ids = tokenizer(examples[0].prompt, add_special_tokens=False)["input_ids"][:RUN]
    planted = b"header" + struct.pack(f"<{RUN}q", *ids) + b"".join(_varint(i) for i in ids)
    assert {leak.rsplit(" as ", 1)[1] for leak in _leaks(planted, examples[:1], tokenizer)} >= {"int64", "varint"}


def test_pema_hybrid_sends_nothing_of_the_data_and_the_remote_memory_build_does(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    examples = _private_examples()
    recorder = Recorder()
    with owner.remote() as remote:
        remote.stub = pb_grpc.ModelOwnerStub(grpc.intercept_channel(remote.channel, recorder))
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
        build_memory_local(tmp_path / "emulator", examples, tmp_path / "memory", show_progress=False)
        config = PemaConfig(rank=8, dropout=0.0, batch_size=32, max_epochs=2)
        train_pema_bundle(tmp_path / "memory", tmp_path / "emulator", config, tmp_path / "pema", show_progress=False)
        push_adapter(remote, tmp_path / "pema", show_progress=False)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "emulator")
        assert _leaks(bytes(recorder.sent), examples, tokenizer) == []

        # PEMA's remote memory build sends every context's token ids, as the CLI warns before it starts.
        remote_build = Recorder()
        remote.stub = pb_grpc.ModelOwnerStub(grpc.intercept_channel(remote.channel, remote_build))
        pull_head(remote, tmp_path / "head", show_progress=False)
        build_memory_remote(remote, tmp_path / "head", examples[:2], tmp_path / "remote", show_progress=False)
    leaks = _leaks(bytes(remote_build.sent), examples[:2], tokenizer)
    assert any(leak.endswith("as varint") for leak in leaks), leaks
