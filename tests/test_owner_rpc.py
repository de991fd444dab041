"""The owner over real gRPC (in-process server): uploads good and bad, tenancy, health and reflection."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import grpc
import pytest
import torch
from conftest import InProcessOwner, sentiment_examples
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load, save

from offsite.client.connection import Remote, RemoteError
from offsite.client.evaluation import evaluate_remote
from offsite.client.pull import pull_emulator
from offsite.client.push import push_adapter
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.model_loading import load_model
from offsite.common.rpc import pb
from offsite.common.scoring import evaluate
from offsite.owner.adapters.plugin import plug
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.limits import LimitExceeded, StreamSlots, TenantLimits, TokenRate
from offsite.owner.server import start_server
from offsite.owner.service import OwnerService
from offsite.owner.store import Store

EMULATOR = "uniform-1-2-1"


@pytest.fixture
def trained(owner: InProcessOwner, tmp_path: Path) -> Path:
    with owner.remote() as remote:
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    out = tmp_path / "adapter"
    train_adapter(
        tmp_path / "emulator",
        sentiment_examples(16),
        TrainConfig(epochs=1, learning_rate=1e-2, train_blocks="all"),  # a bottom block too: see outside_blocks
        out,
        show_progress=False,
    )
    return out


def push_raw(
    owner: InProcessOwner, files: dict[str, bytes], declared: dict[str, int] | None = None
) -> pb.PushAdapterResponse:
    entries = [
        pb.FileEntry(name=n, size=(declared or {}).get(n, len(d)), sha256=hashlib.sha256(d).hexdigest())
        for n, d in files.items()
    ]
    messages = [pb.PushAdapterRequest(header=pb.PushAdapterHeader(emulator=EMULATOR, files=entries))]
    for name, data in files.items():
        for offset in range(0, len(data), 1 << 20):
            messages.append(
                pb.PushAdapterRequest(
                    chunk=pb.FileChunk(file=name, offset=offset, data=data[offset : offset + (1 << 20)])
                )
            )
    with owner.remote() as remote:
        return remote.push(iter(messages))


def bundle_files(adapter: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(adapter.iterdir())}


def with_tensors(files: dict[str, bytes], mutate) -> dict[str, bytes]:
    tensors = load(files["adapter_model.safetensors"])
    mutate(tensors)
    return {**files, "adapter_model.safetensors": save(tensors)}


def assert_no_trace(owner: InProcessOwner) -> None:
    assert owner.store.list_adapters("alice") == []
    assert list((owner.store.root / "adapters").iterdir()) == []
    assert list((owner.store.root / "tmp").iterdir()) == []


def test_push_stores_and_evaluates_like_in_process_plug_in(owner: InProcessOwner, trained: Path) -> None:
    with owner.remote() as remote:
        response = push_adapter(remote, trained, show_progress=False)
        again = push_adapter(remote, trained, show_progress=False)
        examples = sentiment_examples(12, offset=3)
        report = evaluate_remote(remote, examples, response.adapter_id, show_progress=False)
    assert response.method == "lora" and len(response.adapter_id) == 64 and again.already_stored
    assert {c.name for c in response.checks} >= {"keys_in_adapter_blocks", "shapes", "finite"}
    local = evaluate(plug(owner.service.loaded.model, trained, "lora"), owner.service.loaded.tokenizer, examples)
    assert abs(report["loss"] - local.loss) < 1e-4
    assert report["accuracy"] == pytest.approx(local.accuracy)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong_shape", "has shape"),
        ("outside_blocks", "outside the adapter blocks"),
        ("nan", "NaN or infinite"),
        ("not_safetensors", "not a valid safetensors file"),
        ("over_cap", "exceeds the cap"),
        ("integer_dtype", "dtype I64"),
        ("modules_to_save", "modules_to_save is not allowed"),
        ("bad_name", "not allowed"),
        ("truncated", "truncated stream"),
    ],
)
def test_bad_uploads_are_rejected_without_trace(owner: InProcessOwner, trained: Path, case: str, message: str) -> None:
    files = bundle_files(trained)
    key = next(k for k in _tensor_keys(files) if "lora_A" in k)
    declared = None
    if case == "wrong_shape":
        files = with_tensors(files, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0] + 1, t[key].shape[1])))
    elif case == "outside_blocks":
        files = with_tensors(files, lambda t: t.__setitem__(key.replace("layers.0.", "layers.2."), t[key].clone()))
    elif case == "nan":
        files = with_tensors(files, lambda t: t[key].__setitem__((0, 0), math.nan))
    elif case == "not_safetensors":
        files["adapter_model.safetensors"] = b"\x80\x04\x95 this is a pickle, not safetensors"
    elif case == "over_cap":
        files["adapter_model.safetensors"] = b"\0" * (3 * 1024 * 1024)
    elif case == "integer_dtype":
        files = with_tensors(files, lambda t: t.__setitem__(key, t[key].long()))
    elif case == "modules_to_save":
        config = json.loads(files["adapter_config.json"])
        config["modules_to_save"] = ["lm_head"]
        files["adapter_config.json"] = json.dumps(config).encode()
    elif case == "bad_name":
        files["../../escape.json"] = b"{}"
    elif case == "truncated":
        declared = {"adapter_model.safetensors": len(files["adapter_model.safetensors"]) + 10}
    with pytest.raises(RemoteError) as caught:
        push_raw(owner, files, declared)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(caught.value)
    assert_no_trace(owner)


def _tensor_keys(files: dict[str, bytes]) -> list[str]:
    header_size = int.from_bytes(files["adapter_model.safetensors"][:8], "little")
    header = json.loads(files["adapter_model.safetensors"][8 : 8 + header_size])
    return sorted(k for k in header if k != "__metadata__")


def test_tenants_see_only_their_own_adapters(owner: InProcessOwner, trained: Path) -> None:
    bob = owner.store.add_tenant("bob")
    with owner.remote() as alice_remote, owner.remote(bob) as bob_remote:
        adapter_id = push_adapter(alice_remote, trained, show_progress=False).adapter_id
        assert [a.adapter_id for a in alice_remote.list_adapters().adapters] == [adapter_id]
        assert list(bob_remote.list_adapters().adapters) == []
        for call in (
            lambda: bob_remote.delete_adapter(adapter_id),
            lambda: list(bob_remote.generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="a", max_new_tokens=2))),
        ):
            with pytest.raises(RemoteError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
        alice_remote.delete_adapter(adapter_id)
        assert list(alice_remote.list_adapters().adapters) == []
    assert_no_trace(owner)


def test_no_token_is_unauthenticated(owner: InProcessOwner) -> None:
    with owner.remote("ofs_wrong") as remote, pytest.raises(RemoteError) as caught:
        remote.model_card()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_pull_rejects_bad_offsets_and_names(owner: InProcessOwner) -> None:
    with owner.remote() as remote:
        for request, code in (
            (("uniform-1-2-1", "model.safetensors", -1), grpc.StatusCode.OUT_OF_RANGE),
            (("uniform-1-2-1", "model.safetensors", 1 << 40), grpc.StatusCode.OUT_OF_RANGE),
            (("uniform-1-2-1", "../registry.sqlite", 0), grpc.StatusCode.NOT_FOUND),
            (("nope", "config.json", 0), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                list(remote.pull(*request))
            assert caught.value.code() == code


def test_pull_resumes_from_an_offset(owner: InProcessOwner) -> None:
    path = owner.service.emulators[EMULATOR].directory / "model.safetensors"
    whole = path.read_bytes()
    with owner.remote() as remote:
        tail = b"".join(c.data for c in remote.pull(EMULATOR, "model.safetensors", 1000))
    assert tail == whole[1000:]


def test_health_and_reflection(owner: InProcessOwner) -> None:
    with grpc.insecure_channel(owner.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="offsite.v1.ModelOwner")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"offsite.v1.ModelOwner", "grpc.health.v1.Health"} <= names


def test_model_card(owner: InProcessOwner) -> None:
    with owner.remote() as remote:
        card = remote.model_card()
    assert card.architecture == "llama" and card.depth == 6
    assert [e.id for e in card.emulators] == [EMULATOR]
    assert len(card.owner_public_key) == 64 and len(card.base_fingerprint) == 64
    report = card.emulators[0].report_card
    stored = owner.service.emulators[EMULATOR].manifest["report_card"]
    assert report.windows > 0 and report.perplexity == pytest.approx(stored["perplexity"])
    assert report.perplexity_ratio == pytest.approx(report.perplexity / report.full_perplexity, rel=1e-3)


def test_the_audit_counts_the_bytes_each_response_had_on_the_wire(owner: InProcessOwner) -> None:
    with owner.remote() as remote:
        chunks = list(remote.pull(EMULATOR, "model.safetensors", 0))
        tokens = list(remote.generate(pb.GenerateRequest(prompt="Review: fine", max_new_tokens=3)))
        card = remote.model_card()
    lines = [json.loads(line) for line in (owner.store.root / "audit.jsonl").read_text().splitlines()]
    by_method = {line["method"].rsplit("/", 1)[1]: line for line in lines}
    assert by_method["PullArtifact"]["bytes_out"] == sum(len(c.SerializeToString()) for c in chunks)
    assert len(tokens) > 1  # several messages in one stream, each counted once
    assert by_method["Generate"]["bytes_out"] == sum(len(t.SerializeToString()) for t in tokens)
    assert by_method["GetModelCard"]["bytes_out"] == len(card.SerializeToString())


def test_every_rpc_is_audited_without_payloads(owner: InProcessOwner, trained: Path) -> None:
    with owner.remote() as remote:
        remote.model_card()
        pushed = push_adapter(remote, trained, show_progress=False)
        list(remote.generate(pb.GenerateRequest(adapter_id=pushed.adapter_id, prompt="Review: fine", max_new_tokens=2)))
    with owner.remote(token="ofs_not_a_token") as stranger, pytest.raises(RemoteError):
        stranger.list_adapters()
    lines = [json.loads(line) for line in (owner.store.root / "audit.jsonl").read_text().splitlines()]
    by_method = {line["method"].rsplit("/", 1)[1]: line for line in lines}
    assert by_method["GetModelCard"]["status"] == "OK" and by_method["GetModelCard"]["tenant"] == "alice"
    push = by_method["PushAdapter"]
    adapter_bytes = sum(p.stat().st_size for p in trained.iterdir())
    assert push["status"] == "OK" and adapter_bytes < push["bytes_in"] < adapter_bytes + 4096, push
    assert by_method["Generate"]["bytes_out"] > 0 and by_method["Generate"]["status"] == "OK"
    refused = by_method["ListAdapters"]
    assert refused["status"] == "UNAUTHENTICATED" and refused["tenant"] is None
    metadata = {"time", "request_id", "tenant", "method", "peer", "bytes_in", "bytes_out", "status", "duration_ms"}
    assert all(set(line) == {"seq", "prev", *metadata} for line in lines)  # seq and prev: the hash chain
    text = (owner.store.root / "audit.jsonl").read_text()
    assert owner.token not in text and "ofs_not_a_token" not in text and "Review: fine" not in text


def test_tenant_quotas_refuse_a_push_with_resource_exhausted_and_keep_no_trace(
    owner: InProcessOwner, trained: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-adapter"
    train_adapter(
        tmp_path / "emulator",
        sentiment_examples(8),
        TrainConfig(epochs=1, learning_rate=3e-3),
        other,
        show_progress=False,
    )
    owner.service.limits = TenantLimits(max_adapters=1)
    with owner.remote() as remote:
        first = push_adapter(remote, trained, show_progress=False)
        assert push_adapter(remote, trained, show_progress=False).already_stored  # a re-push costs no quota
        with pytest.raises(RemoteError) as full:
            push_adapter(remote, other, show_progress=False)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 1 adapters, its quota is 1" in str(full.value)
        assert [a.adapter_id for a in remote.list_adapters().adapters] == [first.adapter_id]
        assert list((owner.store.root / "tmp").iterdir()) == []
        remote.delete_adapter(first.adapter_id)
        owner.service.limits = TenantLimits(max_bytes=1000)
        with pytest.raises(RemoteError) as too_big:
            push_adapter(remote, other, show_progress=False)
        assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota of 1000 bytes" in str(too_big.value)
        assert owner.store.list_adapters("alice") == []


def test_streams_over_the_tenant_limit_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    store = Store(tmp_path / "limited")
    token = store.add_tenant("alice")
    limits = TenantLimits(max_streams=0)
    service = OwnerService(
        load_model(str(tiny_model_dir("llama"))), store, [EmulatorSpec.parse("uniform:1-2-1")], limits=limits
    )
    server, port = start_server(service, store, "127.0.0.1:0")
    try:
        with Remote(f"127.0.0.1:{port}", token) as remote:
            assert remote.model_card().emulators  # unary calls are not streams
            with pytest.raises(RemoteError) as refused:
                list(remote.generate(pb.GenerateRequest(prompt="hi", max_new_tokens=1)))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 0" in str(refused.value)
    finally:
        server.stop(None)
        store.close()


def test_stream_slots_count_per_tenant_and_free_on_release() -> None:
    slots = StreamSlots(2)
    slots.acquire("alice")
    with slots.held("alice"):
        with pytest.raises(LimitExceeded, match="already has 2 streaming calls"):
            slots.acquire("alice")
        slots.acquire("bob")  # another tenant has its own count
    slots.acquire("alice")


def test_represent_tokens_per_second_are_limited_per_tenant(owner: InProcessOwner) -> None:
    owner.service.represent_rate = TokenRate(10)
    request = pb.RepresentRequest(token_ids=[1] * 8)
    with owner.remote() as remote:
        assert len(list(remote.represent(iter([request])))) == 1
        with pytest.raises(RemoteError) as limited:
            list(remote.represent(iter([request])))  # 8 more tokens within the same second
    assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate of 10 tokens/s" in str(limited.value)
    rate = TokenRate(100)
    rate.take("alice", 100)
    rate.take("bob", 100)  # another tenant has its own bucket
    with pytest.raises(LimitExceeded):
        rate.take("alice", 50)
