"""PEMA over gRPC: Represent equals an in-process forward, requests are batched, the head artifact verifies, remote
and owner-side generation agree token for token, and bad PEMA uploads are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import InProcessOwner
from safetensors.torch import load_file, save_file

from offsite.client.connection import RemoteError
from offsite.client.memory import build_memory_local, build_memory_remote
from offsite.client.pema_generation import generate_remote_pema
from offsite.client.pull import pull_emulator, pull_head
from offsite.client.push import push_adapter
from offsite.client.training.pema import train_pema_bundle
from offsite.common.contract import PEMA_WEIGHTS_FILE
from offsite.common.examples import Example
from offsite.common.generation.sampling import SamplingConfig
from offsite.common.manifest import read_manifest, write_manifest
from offsite.common.pema.config import PemaConfig
from offsite.common.pema.head import Head
from offsite.common.pema.representation import (
    OWN_GENERATION,
    LocalRepresenter,
    build_memory,
    own_generation,
    teacher_forcing,
)
from offsite.common.rpc import pb
from offsite.common.wire_tensors import decode_tensor
from offsite.owner.service import RepresentPolicy

EXAMPLES = [
    Example(prompt=f"Translate: {word}\nGerman:", completion=f" {german}")
    for word, german in [("house", "Haus"), ("dog", "Hund"), ("cat", "Katze"), ("tree", "Baum")] * 6
]
SMALL = PemaConfig(rank=16, dropout=0.0, batch_size=32, max_epochs=3, patience=1)


@pytest.fixture
def owner(owner: InProcessOwner) -> InProcessOwner:
    """These tests compare full log-probs and generate with P_LM: this owner's policy allows them (the default is
    top-k only, see tests/test_represent_policy.py)."""
    owner.service.represent_policy = RepresentPolicy(log_probs="full")
    return owner


def _represent(owner: InProcessOwner, request: pb.RepresentRequest) -> pb.RepresentResponse:
    with owner.remote() as remote:
        [response] = list(remote.represent(iter([request])))
    return response


def test_represent_equals_an_in_process_forward(owner: InProcessOwner) -> None:
    ids = [5, 17, 3, 99, 42, 8]
    states, logits = LocalRepresenter(owner.service.loaded.model).forward([ids])
    response = _represent(owner, pb.RepresentRequest(token_ids=ids, log_probs="full"))
    hidden = decode_tensor(response.hidden, "float32", (response.positions, response.hidden_size))
    torch.testing.assert_close(hidden, states[0], atol=1e-5, rtol=0)
    log_probs = decode_tensor(response.log_probs, "float32", (response.positions, response.vocab_size))
    torch.testing.assert_close(log_probs, torch.log_softmax(logits[0], -1), atol=1e-5, rtol=0)

    top = _represent(owner, pb.RepresentRequest(token_ids=ids, log_probs="top_k", top_k=3, last_only=True))
    assert top.positions == 1 and not top.log_probs
    top_ids = decode_tensor(top.top_k_ids, "int32", (1, 3))
    assert top_ids[0].tolist() == torch.log_softmax(logits[0][-1], -1).topk(3).indices.tolist()
    for dtype, tolerance in (("float16", 1e-2), ("bfloat16", 5e-2)):
        half = _represent(owner, pb.RepresentRequest(token_ids=ids, dtype=dtype))
        decoded = decode_tensor(half.hidden, dtype, (half.positions, half.hidden_size)).float()
        torch.testing.assert_close(decoded, states[0], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"token_ids": []}, "token_ids is empty"),
        ({"token_ids": [10**6]}, "token ids must lie in"),
        ({"token_ids": [1] * 5000}, "at most 2048"),
        ({"token_ids": [1], "dtype": "int8"}, "dtype must be one of"),
        ({"token_ids": [1], "log_probs": "top_k", "top_k": 0}, "top_k must be in"),
    ],
)
def test_bad_represent_requests_are_refused(owner: InProcessOwner, request_fields: dict, message: str) -> None:
    with pytest.raises(RemoteError) as caught:
        _represent(owner, pb.RepresentRequest(**request_fields))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(caught.value)


def test_head_artifact_is_signed_and_reproduces_the_logits(owner: InProcessOwner, tmp_path: Path) -> None:
    with owner.remote() as remote:
        pulled = pull_head(remote, tmp_path / "head", show_progress=False)
    assert pulled["base_fingerprint"] == owner.service.fingerprint
    head = Head.load(tmp_path / "head")
    states, logits = LocalRepresenter(owner.service.loaded.model).forward([[4, 5, 6]])
    torch.testing.assert_close(head.logits(states[0]), logits[0], atol=1e-5, rtol=1e-5)


def test_own_generation_contexts_over_represent_match_an_in_process_build(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    """The owner picks each greedy token (top-1 over Represent); the memory equals one built in process."""
    examples = EXAMPLES[:4]
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
        remote_memory = build_memory_remote(
            remote, tmp_path / "head", examples, tmp_path / "m", "float32", show_progress=False, contexts=OWN_GENERATION
        )
    model, tokenizer = owner.service.loaded.model, owner.service.loaded.tokenizer
    representer = LocalRepresenter(model)
    local = build_memory(
        representer,
        own_generation(representer, teacher_forcing(tokenizer, examples, 256)),
        tmp_path / "l",
        "float32",
        {},
    )
    assert remote_memory.info["contexts"] == OWN_GENERATION
    assert np.array_equal(remote_memory.values, local.values)
    np.testing.assert_allclose(np.asarray(remote_memory.keys), np.asarray(local.keys), atol=1e-5, rtol=1e-5)


def test_remote_and_local_memories_agree_and_generation_matches_owner_side(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
        remote_memory = build_memory_remote(
            remote, tmp_path / "head", EXAMPLES, tmp_path / "memory", "float32", show_progress=False
        )
    hybrid = build_memory_local(tmp_path / "emulator", EXAMPLES, tmp_path / "hybrid", "float32", show_progress=False)
    assert len(remote_memory) == len(hybrid) and np.array_equal(remote_memory.values, hybrid.values)
    assert remote_memory.info["source"] == "owner" and hybrid.info["source"].startswith("emulator")

    trained = train_pema_bundle(tmp_path / "memory", tmp_path / "head", SMALL, tmp_path / "pema", show_progress=False)
    assert trained["memory_rows"] == len(remote_memory) and math.isfinite(trained["validation_ce"])
    pushed_training = read_manifest(tmp_path / "pema")["training"]
    assert "memory_rows" not in pushed_training, "the pushed manifest does not tell the owner how much data there was"
    with owner.remote() as remote:
        pushed = push_adapter(remote, tmp_path / "pema", show_progress=False)
        assert pushed.method == "pema" and {c.name for c in pushed.checks} >= {"shapes", "finite"}
        prompt, request = EXAMPLES[0].prompt, {"max_new_tokens": 6, "planned_length": 4}
        pieces = generate_remote_pema(remote, tmp_path / "pema", tmp_path / "head", prompt, SamplingConfig(6), 4)
        remote_tokens = [p.token for p in pieces if p.token is not None]
        events = list(remote.generate(pb.GenerateRequest(adapter_id=pushed.adapter_id, prompt=prompt, **request)))
    owner_tokens = [e.token_id for e in events if not e.done]
    assert remote_tokens and remote_tokens == owner_tokens

    # A hybrid adapter, trained on emulator memory only, plugs in the same way.
    train_pema_bundle(tmp_path / "hybrid", tmp_path / "emulator", SMALL, tmp_path / "pema-hybrid", show_progress=False)
    with owner.remote() as remote:
        assert push_adapter(remote, tmp_path / "pema-hybrid", show_progress=False).method == "pema"


def _tamper(adapter: Path, mutate) -> None:
    tensors = load_file(str(adapter / PEMA_WEIGHTS_FILE))
    mutate(tensors)
    save_file(tensors, str(adapter / PEMA_WEIGHTS_FILE))
    manifest = read_manifest(adapter)
    manifest.pop("files", None)
    write_manifest(adapter, manifest)


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or infinite"),
        ("shape", "has shape"),
        ("extra", "tensors must be exactly"),
        ("rank", "rank must be an integer"),
    ],
)
def test_bad_pema_uploads_are_refused_without_trace(owner: InProcessOwner, tmp_path: Path, case: str, message: str):
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
        build_memory_remote(remote, tmp_path / "head", EXAMPLES[:8], tmp_path / "memory", show_progress=False)
    train_pema_bundle(tmp_path / "memory", tmp_path / "head", SMALL, tmp_path / "pema", show_progress=False)
    adapter = tmp_path / "pema"
    if case == "nan":
        _tamper(adapter, lambda t: t["A.weight"].__setitem__((0, 0), math.nan))
    elif case == "shape":
        _tamper(adapter, lambda t: t.__setitem__("A.weight", torch.zeros(17, t["A.weight"].shape[1])))
    elif case == "extra":
        _tamper(adapter, lambda t: t.__setitem__("lm_head.weight", torch.zeros(2, 2)))
    else:
        config = json.loads((adapter / "pema_config.json").read_text())
        (adapter / "pema_config.json").write_text(json.dumps({**config, "rank": 10**6}))
        manifest = read_manifest(adapter)
        manifest.pop("files", None)
        write_manifest(adapter, manifest)
    with owner.remote() as remote, pytest.raises(RemoteError) as caught:
        push_adapter(remote, adapter, show_progress=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(caught.value)
    assert owner.store.list_adapters("alice") == []
    assert list((owner.store.root / "tmp").iterdir()) == []
