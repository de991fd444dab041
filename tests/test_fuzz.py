"""Property-based fuzzing of every request message: each bad input gets a precise status, the server stays up, and
the store keeps no trace of it."""

from __future__ import annotations

import grpc
import pytest
from conftest import InProcessOwner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offsite.client.connection import RemoteError
from offsite.common.contract import ADAPTER_FILE_NAMES
from offsite.common.rpc import pb

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EXPECTED_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,  # e.g. use_owner_data when the owner has no validation set
}
names = st.one_of(
    st.sampled_from(
        ["", ".", "..", "../offsite.json", "/etc/passwd", "a/../../b", "ｏｆｆｓｉｔｅ.json", "\u202eexe", "x" * 300]
    ),
    st.sampled_from(sorted(ADAPTER_FILE_NAMES)),
    st.text(max_size=40),
)
int64s = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 2**21))
int32s = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 64))
sha256s = st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), st.text(max_size=70))


def _call(call) -> grpc.StatusCode:
    """The status of a call that either returns, streams, or raises."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            for _ in result:
                pass
    except RemoteError as error:
        assert str(error).split(": ", 1)[1], "a refusal must say why"
        return error.code
    except grpc.RpcError as error:
        assert error.details(), "a refusal must say why"
        return error.code()
    return grpc.StatusCode.OK


def _assert_healthy_and_clean(owner: InProcessOwner) -> None:
    with grpc.insecure_channel(owner.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert list((owner.store.root / "tmp").iterdir()) == []
    assert list((owner.store.root / "adapters").iterdir()) == []
    assert owner.store.list_adapters("alice") == []


@FUZZ
@given(artifact=st.one_of(st.just("uniform-1-2-1"), names), file=names, offset=int64s)
def test_pull_requests(owner: InProcessOwner, artifact: str, file: str, offset: int) -> None:
    with owner.remote() as remote:
        code = _call(lambda: remote.pull(artifact, file, offset))
    if code == grpc.StatusCode.OK:  # only a real file at an offset inside it may stream
        assert artifact == "uniform-1-2-1" and file in owner.service.emulators[artifact].files and offset >= 0
    else:
        assert code in EXPECTED_REFUSALS, code
    _assert_healthy_and_clean(owner)


file_entries = st.builds(pb.FileEntry, name=names, size=int64s, sha256=sha256s)
headers = st.builds(
    pb.PushAdapterHeader,
    emulator=st.one_of(st.just("uniform-1-2-1"), names),
    files=st.lists(file_entries, max_size=10),
)
chunks = st.builds(pb.FileChunk, file=names, offset=int64s, data=st.binary(max_size=2048))
push_streams = st.lists(
    st.one_of(
        st.builds(pb.PushAdapterRequest, header=headers),
        st.builds(pb.PushAdapterRequest, chunk=chunks),
    ),
    max_size=6,
)


@FUZZ
@given(messages=push_streams)
def test_push_streams(owner: InProcessOwner, messages: list[pb.PushAdapterRequest]) -> None:
    with owner.remote() as remote:
        code = _call(lambda: remote.push(iter(messages)))
    assert code in EXPECTED_REFUSALS, code  # no random stream is a valid adapter
    _assert_healthy_and_clean(owner)


examples = st.builds(
    pb.Example,
    prompt=st.text(max_size=60),
    completion=st.text(max_size=20),
    choices=st.lists(st.text(max_size=10), max_size=3),
    text=st.text(max_size=40),
)


@FUZZ
@given(
    adapter_id=st.one_of(st.just(""), names, sha256s),
    items=st.lists(examples, max_size=3),
    use_owner_data=st.booleans(),
    limit=int32s,
    batch_size=int32s,
)
def test_evaluate_requests(owner: InProcessOwner, adapter_id, items, use_owner_data, limit, batch_size) -> None:
    request = pb.EvaluateRequest(
        adapter_id=adapter_id, examples=items, use_owner_data=use_owner_data, limit=limit, batch_size=batch_size
    )
    with owner.remote() as remote:
        code = _call(lambda: remote.evaluate(request))
    assert code == grpc.StatusCode.OK or code in EXPECTED_REFUSALS, code
    _assert_healthy_and_clean(owner)


@FUZZ
@given(
    adapter_id=st.one_of(st.just(""), names, sha256s),
    prompt=st.text(max_size=80),
    max_new_tokens=st.one_of(st.integers(-(2**31), 0), st.integers(1, 3), st.integers(1025, 2**31 - 1)),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    seed=int64s,
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    stop=st.lists(st.text(max_size=80), max_size=6),
)
def test_generate_requests(
    owner: InProcessOwner, adapter_id, prompt, max_new_tokens, temperature, seed, top_p, stop
) -> None:
    request = pb.GenerateRequest(
        adapter_id=adapter_id,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        top_p=top_p,
        stop=stop,
    )
    with owner.remote() as remote:
        code = _call(lambda: remote.generate(request))
    assert code == grpc.StatusCode.OK or code in EXPECTED_REFUSALS, code
    if code == grpc.StatusCode.OK:
        assert adapter_id == "" and 1 <= max_new_tokens <= 3
    _assert_healthy_and_clean(owner)


@FUZZ
@given(adapter_id=st.one_of(names, sha256s))
def test_delete_requests(owner: InProcessOwner, adapter_id: str) -> None:
    with owner.remote() as remote:
        code = _call(lambda: remote.delete_adapter(adapter_id))
    assert code in EXPECTED_REFUSALS, code
    _assert_healthy_and_clean(owner)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 16, b"\xff" * 64, bytes(range(256))])
def test_raw_bytes_that_are_no_message_are_refused(owner: InProcessOwner, garbage: bytes) -> None:
    with grpc.insecure_channel(owner.address) as channel:
        call = channel.unary_stream(
            "/offsite.v1.ModelOwner/PullArtifact", request_serializer=None, response_deserializer=None
        )
        code = _call(lambda: call(garbage, metadata=owner.remote().metadata, timeout=10))
    assert code in EXPECTED_REFUSALS | {grpc.StatusCode.INTERNAL}, code
    _assert_healthy_and_clean(owner)


represent_requests = st.builds(
    pb.RepresentRequest,
    token_ids=st.lists(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 400)), max_size=8),
    dtype=st.one_of(st.sampled_from(["", "float32", "float16", "bfloat16", "int8"]), st.text(max_size=8)),
    log_probs=st.one_of(st.sampled_from(["", "full", "top_k"]), st.text(max_size=6)),
    top_k=int32s,
    last_only=st.booleans(),
)


@FUZZ
@given(requests=st.lists(represent_requests, min_size=1, max_size=3))
def test_represent_streams(owner: InProcessOwner, requests: list[pb.RepresentRequest]) -> None:
    with owner.remote() as remote:
        code = _call(lambda: remote.represent(iter(requests)))
    assert code == grpc.StatusCode.OK or code in EXPECTED_REFUSALS, code
    _assert_healthy_and_clean(owner)
