"""Abuse (issue 16): what an attacker or a careless user could do to the owner's daemon and the data owner's files.

Each test reproduces one finding: streams that starve the server, evaluations and prompts without bounds, work done
for responses that cannot be sent, and commands that deleted directories they did not write.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import TINY_LAYOUT, InProcessOwner, sentiment_examples, write_jsonl
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_owner_rpc import assert_no_trace, bundle_files, push_raw

from offsite.client.cli import main as client_main
from offsite.client.connection import ClientTls, Remote, RemoteError
from offsite.client.memory import build_memory_local
from offsite.client.pull import pull_emulator
from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common import output_dir
from offsite.common.contract import MANIFEST_NAME, MAX_CHOICES, MAX_EVAL_FORWARDS, MAX_STREAMS_PER_TENANT
from offsite.common.manifest import verify_bundle
from offsite.common.model_loading import load_model
from offsite.common.rpc import pb
from offsite.owner import service as owner_service
from offsite.owner.cli import main as owner_main
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.limits import ServerLimits, TenantLimits
from offsite.owner.server import start_server
from offsite.owner.service import OwnerService, RepresentPolicy
from offsite.owner.store import Store

EMULATOR = f"uniform-{TINY_LAYOUT}"
AVAILABILITY_SECONDS = 1.0  # the target for health checks and small calls under abuse


class Served:
    """An owner with its own limits, and a token for each of several tenants."""

    def __init__(self, tiny_model_dir, root: Path, tenants: TenantLimits, server: ServerLimits):
        self.store = Store(root / "store")
        self.tokens = {name: self.store.add_tenant(name) for name in ("alice", "bob", "carol")}
        self.service = OwnerService(
            load_model(str(tiny_model_dir("llama"))),
            self.store,
            [EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")],
            limits=tenants,
        )
        self.server, port = start_server(self.service, self.store, "127.0.0.1:0", limits=server)
        self.address = f"127.0.0.1:{port}"

    def remote(self, tenant: str = "alice", timeout: float | None = None) -> Remote:
        return Remote(self.address, self.tokens[tenant], timeout=timeout)

    def close(self) -> None:
        self.server.stop(None)
        self.store.close()


@pytest.fixture
def serve(tiny_model_dir, tmp_path: Path) -> Iterator:
    started: list[Served] = []

    def start(tenants: TenantLimits | None = None, server: ServerLimits | None = None) -> Served:
        started.append(Served(tiny_model_dir, tmp_path, tenants or TenantLimits(), server or ServerLimits()))
        return started[-1]

    yield start
    for served in started:
        served.close()


def _held_requests(release: threading.Event) -> Iterator[pb.RepresentRequest]:
    """One request, then nothing until `release`: an idle stream that keeps its slot."""
    yield pb.RepresentRequest(token_ids=[5, 6, 7])
    release.wait(60)


def _until_refused_no_more(call: callable, deadline_seconds: float = 10.0) -> None:
    """Retries `call` while the owner answers RESOURCE_EXHAUSTED (a slot not yet free)."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            call()
            return
        except RemoteError as error:
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# Finding 1: two tenants hung the whole server


def test_two_tenants_holding_idle_streams_cannot_starve_health_checks_or_a_third_tenant(serve) -> None:
    owner = serve()
    release = threading.Event()
    remotes, calls = [], []
    try:
        for tenant in ("alice", "bob"):
            for _ in range(MAX_STREAMS_PER_TENANT):
                remote = owner.remote(tenant, timeout=60)
                remotes.append(remote)
                call = remote.stub.Represent(_held_requests(release), metadata=remote.metadata, timeout=60)
                next(call)  # the owner answered: this stream holds a worker thread and waits, idle
                calls.append(call)
        with grpc.insecure_channel(owner.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=AVAILABILITY_SECONDS
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with owner.remote("carol", timeout=AVAILABILITY_SECONDS) as carol:
            assert carol.model_card().emulators
            assert list(carol.list_adapters().adapters) == []
            # carol's own stream still gets a slot and an answer
            [response] = list(carol.represent(iter([pb.RepresentRequest(token_ids=[1, 2])])))
            assert response.positions == 2
        with owner.remote("alice", timeout=AVAILABILITY_SECONDS) as alice, pytest.raises(RemoteError) as refused:
            list(alice.represent(iter([pb.RepresentRequest(token_ids=[1])])))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, "a tenant over its limit is refused at once"
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for remote in remotes:
            remote.close()


def test_the_server_sizes_threads_streams_and_concurrent_calls_together() -> None:
    limits = ServerLimits()
    assert limits.max_streams + 1 <= limits.workers == limits.max_concurrent_rpcs
    with pytest.raises(ValueError, match="at least one worker"):
        ServerLimits(workers=4, max_streams=4)


def test_an_idle_stream_is_cancelled_and_frees_its_slot(serve) -> None:
    owner = serve(TenantLimits(max_streams=1), ServerLimits(stream_idle_seconds=0.5))
    release = threading.Event()
    started = time.monotonic()
    with owner.remote(timeout=30) as remote:
        call = remote.stub.Represent(_held_requests(release), metadata=remote.metadata, timeout=30)
        next(call)
        with pytest.raises(grpc.RpcError) as ended:
            next(call)  # the client sends nothing more; the owner gives up on it
        release.set()
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 10
        _until_refused_no_more(lambda: list(remote.generate(pb.GenerateRequest(prompt="hi", max_new_tokens=1))))


def test_a_stream_past_its_overall_deadline_is_cancelled_even_when_busy(serve) -> None:
    owner = serve(server=ServerLimits(stream_idle_seconds=30, stream_max_seconds=1.0))

    def steady() -> Iterator[pb.RepresentRequest]:
        for _ in range(200):
            yield pb.RepresentRequest(token_ids=[3, 4])
            time.sleep(0.05)

    started = time.monotonic()
    with owner.remote(timeout=30) as remote, pytest.raises(RemoteError) as ended:
        list(remote.represent(steady()))
    assert ended.value.code == grpc.StatusCode.CANCELLED
    assert time.monotonic() - started < 8  # 200 requests would take 10 s


# Finding 2: one Evaluate could exhaust memory or CPU


def _evaluate(remote: Remote, examples: list[pb.Example], batch_size: int = 0) -> list[pb.EvaluateEvent]:
    return list(remote.evaluate(pb.EvaluateRequest(examples=examples, batch_size=batch_size)))


@pytest.mark.parametrize(
    "examples, batch_size, message",
    [
        ([pb.Example(prompt="a", completion=" b")], 2**31 - 1, "batch_size 2147483647 is too large"),
        (
            [pb.Example(prompt="a", choices=[f" c{i}" for i in range(MAX_CHOICES + 1)], completion=" c0")],
            0,
            f"has {MAX_CHOICES + 1} choices; at most {MAX_CHOICES}",
        ),
        (
            [pb.Example(prompt="a", choices=[f" c{i}" for i in range(MAX_CHOICES)], completion=" c0")]
            * (MAX_EVAL_FORWARDS // MAX_CHOICES + 1),
            0,
            f"at most {MAX_EVAL_FORWARDS}",
        ),
    ],
    ids=["batch-size", "choices", "forwards"],
)
def test_evaluate_refuses_unbounded_work(
    owner: InProcessOwner, examples: list[pb.Example], batch_size: int, message: str
) -> None:
    with owner.remote() as remote, pytest.raises(RemoteError) as refused:
        _evaluate(remote, examples, batch_size)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(refused.value)


def test_a_cancelled_evaluation_stops_before_its_stream_slot_is_freed(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    running = []
    real_steps = owner_service.evaluation_steps

    def counted(*args, **kwargs):
        running.append(1)
        try:
            yield from real_steps(*args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(owner_service, "evaluation_steps", counted)
    owner = serve(TenantLimits(max_streams=1))
    examples = [pb.Example(prompt=e.prompt, completion=e.completion) for e in sentiment_examples(4000)]
    with owner.remote(timeout=60) as remote:
        request = pb.EvaluateRequest(examples=examples, batch_size=1)
        call = remote.stub.Evaluate(request, metadata=remote.metadata, timeout=60)
        assert next(call).WhichOneof("event") == "progress"
        call.cancel()
        # The moment the slot is free again, no evaluation may still be running.
        _until_refused_no_more(lambda: list(remote.generate(pb.GenerateRequest(prompt="hi", max_new_tokens=1))))
        assert running == [], "the cancelled evaluation kept running after its slot was freed"


# Finding 3: Generate did not cap the prompt


def test_generate_refuses_a_prompt_longer_than_the_context(owner: InProcessOwner) -> None:
    context = owner.service.loaded.model.config.max_position_embeddings
    with owner.remote() as remote, pytest.raises(RemoteError) as refused:
        list(remote.generate(pb.GenerateRequest(prompt="the movie " * context, max_new_tokens=8)))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context of {context} tokens" in str(refused.value)
    with owner.remote() as remote:  # a prompt that fits, with room for its new tokens, still generates
        assert list(remote.generate(pb.GenerateRequest(prompt="the movie", max_new_tokens=2)))[-1].done


# Finding 4: Represent computed every position's logits, and could fail only after the work


def test_represent_computes_logits_only_where_log_probs_are_asked(owner: InProcessOwner) -> None:
    owner.service.represent_policy = RepresentPolicy(log_probs="full")  # the owner allows what this test counts
    rows: list[int] = []
    head = owner.service.loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[:-1].numel()))
    ids = list(range(3, 43))
    try:
        with owner.remote() as remote:
            for request, expected in (
                (pb.RepresentRequest(token_ids=ids), 0),
                (pb.RepresentRequest(token_ids=ids, log_probs="full", last_only=True), 1),
                (pb.RepresentRequest(token_ids=ids, log_probs="top_k", top_k=2), len(ids)),
            ):
                rows.clear()
                [response] = list(remote.represent(iter([request])))
                assert sum(rows) == expected, f"{request.log_probs or 'no'} log-probs computed {sum(rows)} rows"
                assert response.vocab_size == owner.service.loaded.model.config.vocab_size
    finally:
        handle.remove()


def test_represent_refuses_a_response_over_the_message_limit_before_the_work(
    owner: InProcessOwner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owner_service, "MAX_MESSAGE_BYTES", 200_000)
    owner.service.represent_policy = RepresentPolicy(log_probs="full")
    batches = owner.service.representations.batches_run
    with owner.remote() as remote, pytest.raises(RemoteError) as refused:
        list(remote.represent(iter([pb.RepresentRequest(token_ids=[4] * 200, log_probs="full")])))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "over the message limit" in str(refused.value)
    assert owner.service.representations.batches_run == batches, "the forward ran for a response that cannot go"
    with owner.remote() as remote:  # the same tokens with the last position's log-probs fit
        request = pb.RepresentRequest(token_ids=[4] * 200, log_probs="full", last_only=True)
        assert [r.positions for r in remote.represent(iter([request]))] == [1]


# Finding 5: commands deleted --out directories they did not write


def _user_files(directory: Path) -> dict[str, bytes]:
    (directory / "sub").mkdir(parents=True)
    (directory / "thesis.tex").write_text("\\documentclass{article} four years of work")
    (directory / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return _snapshot(directory)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _tamper_manifest(owner: InProcessOwner) -> None:
    """The owner (malicious, or broken) serves a manifest whose signature no longer verifies."""
    path = owner.service.emulators[EMULATOR].directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["method"] = "tampered"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_a_failing_pull_never_deletes_user_files(owner: InProcessOwner, tmp_path: Path) -> None:
    out = tmp_path / "my-documents"
    before = _user_files(out)
    _tamper_manifest(owner)
    with owner.remote() as remote, pytest.raises(ValueError) as refused:
        pull_emulator(remote, out, show_progress=False)
    assert _snapshot(out) == before
    assert str(out) in str(refused.value) and "not an offsite emulator bundle" in str(refused.value)
    assert not output_dir.staging_dir(out).exists()


def test_a_pull_that_fails_verification_keeps_the_bundle_it_would_replace(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    out, fresh = tmp_path / "emulator", tmp_path / "fresh"
    with owner.remote() as remote:
        pull_emulator(remote, out, show_progress=False)
        pulled = _snapshot(out)
        _tamper_manifest(owner)
        for target in (out, fresh):
            with pytest.raises(ValueError, match="signature does not verify"):
                pull_emulator(remote, target, show_progress=False)
    assert _snapshot(out) == pulled
    verify_bundle(out)
    assert not fresh.exists() and not output_dir.staging_dir(fresh).exists()
    assert not output_dir.staging_dir(out).exists()


def test_train_memory_build_and_build_emulator_refuse_a_directory_of_user_files(
    owner: InProcessOwner, tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = tmp_path / "emulator"
    with owner.remote() as remote:
        pull_emulator(remote, emulator, show_progress=False)
    examples = sentiment_examples(4)
    out = tmp_path / "my-documents"
    before = _user_files(out)

    with pytest.raises(output_dir.OutputRefused, match="not an offsite adapter bundle"):
        train_adapter(emulator, examples, TrainConfig(epochs=1), out, show_progress=False)
    assert _snapshot(out) == before

    with pytest.raises(output_dir.OutputRefused, match="not an offsite PEMA memory"):
        build_memory_local(emulator, examples, out, show_progress=False)
    assert _snapshot(out) == before

    command = ["build-emulator", "--model", str(tiny_model_dir("llama")), "--layout", TINY_LAYOUT]
    umask = os.umask(0o022)  # offsite-owner sets its own umask: keep this test process's
    try:
        with pytest.raises(SystemExit):
            owner_main([*command, "--out", str(out), "--store", str(tmp_path / "owner-store")])
    finally:
        os.umask(umask)
    assert f"{out} is not empty and is not an offsite emulator bundle" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert not output_dir.staging_dir(out).exists()


def test_train_replaces_its_own_bundle_and_refuses_one_holding_other_files(
    owner: InProcessOwner, tmp_path: Path
) -> None:
    emulator, adapter = tmp_path / "emulator", tmp_path / "adapter"
    with owner.remote() as remote:
        pull_emulator(remote, emulator, show_progress=False)
    config = TrainConfig(epochs=1)
    train_adapter(emulator, sentiment_examples(4), config, adapter, show_progress=False)
    train_adapter(emulator, sentiment_examples(4, offset=1), config, adapter, show_progress=False)
    verify_bundle(adapter, signed=False)
    (adapter / "notes.txt").write_text("mine")
    with pytest.raises(output_dir.OutputRefused, match="also holds notes.txt"):
        train_adapter(emulator, sentiment_examples(4), config, adapter, show_progress=False)
    assert (adapter / "notes.txt").read_text() == "mine"


def test_a_staging_directory_offsite_did_not_make_is_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    foreign = output_dir.staging_dir(out)
    foreign.mkdir()
    (foreign / "draft.txt").write_text("not offsite's")
    with pytest.raises(output_dir.OutputRefused, match="offsite did not make it"):
        with output_dir.staged(out, output_dir.ADAPTER):
            pass
    output_dir.abandon(out)
    assert (foreign / "draft.txt").read_text() == "not offsite's"
    assert not out.exists()


# Finding 7: plaintext to remote owners, and remote evaluation without consent


def test_the_client_uses_tls_to_a_remote_owner_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_insecure = grpc.insecure_channel
    monkeypatch.setattr(grpc, "secure_channel", lambda *_a, **_k: opened.append("tls") or real_insecure("x"))
    monkeypatch.setattr(grpc, "insecure_channel", lambda *a, **k: opened.append("plain") or real_insecure(*a, **k))
    for server, insecure in (("owner.example:50051", False), ("10.0.0.7:50051", False), ("127.0.0.1:1", False)):
        Remote(server, "token", insecure=insecure).close()
    Remote("[::1]:50051", "token").close()
    Remote("owner.example:50051", "token", insecure=True).close()
    assert opened == ["tls", "tls", "plain", "plain", "plain"]
    with pytest.raises(ValueError, match="--insecure turns TLS off"):
        Remote("owner.example:50051", "token", tls=ClientTls(), insecure=True)


def test_eval_on_the_owner_asks_for_consent_before_sending_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(sentiment_examples(3), tmp_path / "dev.jsonl")
    with pytest.raises(SystemExit) as exited:
        client_main(["eval", "--server", "127.0.0.1:1", "--token", "t", "--data", str(data), "--json"])
    assert exited.value.code == 2
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert "--yes" in error and "3 examples" in error


# Finding 9 (in part): a world-readable store


def test_the_store_and_its_registry_are_the_owners_alone(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # a permissive umask, as a careless shell might have
    try:
        store = Store(tmp_path / "store")
        store.add_tenant("alice")
        store.close()
    finally:
        os.umask(umask)
    root = tmp_path / "store"
    for directory in (root, root / "adapters", root / "tmp", root / "emulators", root / "models"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE((root / "registry.sqlite").stat().st_mode) == 0o600


# Finding 9 (in part): the LoRA config was checked against a denylist, and took Infinity


@pytest.fixture
def lora_adapter(owner: InProcessOwner, tmp_path: Path) -> Path:
    with owner.remote() as remote:
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    train_adapter(
        tmp_path / "emulator", sentiment_examples(4), TrainConfig(epochs=1), tmp_path / "lora", show_progress=False
    )
    return tmp_path / "lora"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lora_alpha", "Infinity", "Infinity is not a number JSON allows"),
        ("lora_alpha", 1e9, "lora_alpha must be a number in"),
        ("lora_dropout", 1.5, "lora_dropout must be a number in [0, 1)"),
        ("use_dora", True, "use_dora is not allowed"),
        ("a_future_peft_option", {"widen": True}, "field 'a_future_peft_option' is not allowed"),
    ],
)
def test_the_lora_config_is_an_allowlist_with_ranges(
    owner: InProcessOwner, lora_adapter: Path, field: str, value: object, message: str
) -> None:
    files = bundle_files(lora_adapter)
    config = json.loads(files["adapter_config.json"])
    config[field] = value
    files["adapter_config.json"] = json.dumps(config).replace('"Infinity"', "Infinity").encode()
    with pytest.raises(RemoteError) as refused:
        push_raw(owner, files)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(refused.value)
    assert_no_trace(owner)


# Finding 6: tenants could be added but never removed or given a new token; `tenants add --json` printed the token


def _owner_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """Runs `offsite-owner ARGV --json` in-process; returns its JSON result and checks nothing else went to stdout."""
    owner_main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def _refused(remote: Remote) -> grpc.StatusCode | None:
    try:
        remote.list_adapters()
    except RemoteError as error:
        return error.code
    return None


def test_tenants_rotate_remove_and_list_take_effect_on_a_running_daemon(
    serve, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = serve()
    store = str(owner.store.root)
    old_alice = owner.remote("alice")
    assert _refused(old_alice) is None
    rotated = _owner_cli(capsys, "tenants", "rotate", "alice", "--store", store, "--show-token")
    assert rotated["token"].startswith("ofs_") and rotated["token"] != owner.tokens["alice"]
    assert _refused(old_alice) == grpc.StatusCode.UNAUTHENTICATED  # no restart: the registry is read per call
    with Remote(owner.address, rotated["token"]) as new_alice:
        assert _refused(new_alice) is None

    bob = owner.remote("bob")
    assert _refused(bob) is None
    removed = _owner_cli(capsys, "tenants", "remove", "bob", "--store", store)
    assert removed == {"ok": True, "tenant": "bob", "adapters_deleted": 0}
    assert _refused(bob) == grpc.StatusCode.UNAUTHENTICATED
    assert _refused(owner.remote("carol")) is None  # the others are untouched

    listed = _owner_cli(capsys, "tenants", "list", "--store", store)
    assert [t["name"] for t in listed["tenants"]] == ["alice", "carol"]
    assert "ofs_" not in json.dumps(listed) and "token" not in json.dumps(listed)
    with pytest.raises(SystemExit):
        owner_main(["tenants", "remove", "bob", "--store", store, "--json"])
    assert "no tenant 'bob'" in capsys.readouterr().out


def test_tenants_add_json_withholds_the_token_unless_asked_and_can_write_it_to_a_file(
    owner: InProcessOwner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(owner.store.root)
    added = _owner_cli(capsys, "tenants", "add", "dave", "--store", store)
    assert added == {"ok": True, "tenant": "dave", "token_withheld": True}
    shown = _owner_cli(capsys, "tenants", "add", "erin", "--store", store, "--show-token")
    assert owner.store.authenticate(shown["token"]) == "erin"

    token_file = tmp_path / "frank.token"
    written = _owner_cli(capsys, "tenants", "add", "frank", "--store", store, "--token-file", str(token_file))
    assert "token" not in written and written["token_file"] == str(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert owner.store.authenticate(token_file.read_text().strip()) == "frank"
    with pytest.raises(SystemExit):  # an existing file is refused before the tenant is added, so no token is lost
        owner_main(["tenants", "add", "grace", "--store", store, "--token-file", str(token_file), "--json"])
    assert "exists" in capsys.readouterr().out and not owner.store.has_tenant("grace")

    # the data owner reads it from the file: nothing secret on the command line, where `ps` shows it
    client_main(["adapters", "list", "--server", owner.address, "--token-file", str(token_file), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True


# Finding 9 (in part): the audit log was world-readable, not fsynced, and a failed write failed the RPC


def test_the_audit_log_is_private_fsynced_per_line_and_its_failure_does_not_fail_the_call(
    owner: InProcessOwner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log_path = owner.store.root / "audit.jsonl"
    log_path.touch()
    log_path.chmod(0o644)  # an old log, or one made by hand
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with owner.remote() as remote:
        remote.model_card()
        remote.list_adapters()
    lines = log_path.read_text().splitlines()
    assert [json.loads(line)["method"].rsplit("/", 1)[-1] for line in lines] == ["GetModelCard", "ListAdapters"]
    assert synced.count(str(log_path)) == len(lines)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600

    log_path.unlink()
    log_path.mkdir()  # every write now fails
    with caplog.at_level("ERROR", logger="offsite.owner.audit"), owner.remote() as remote:
        assert remote.model_card().emulators  # the call still answers
    assert any("could not record" in r.getMessage() and "GetModelCard" in r.getMessage() for r in caplog.records)


# Finding 9 (in part): stored adapters were loaded without checking their files against the hashes pushed


def test_a_stored_adapter_changed_on_disk_is_refused_when_loaded(owner: InProcessOwner, lora_adapter: Path) -> None:
    adapter_id = push_raw(owner, bundle_files(lora_adapter)).adapter_id
    config_path = owner.store.adapter_dir(adapter_id) / "adapter_config.json"
    original = config_path.read_bytes()
    config = json.loads(original)
    config["lora_alpha"] = config["lora_alpha"] * 100  # still a valid config: only the hash can tell
    config_path.write_text(json.dumps(config))
    request = pb.EvaluateRequest(adapter_id=adapter_id, examples=[pb.Example(prompt="a", completion=" b")])
    with owner.remote() as remote:
        with pytest.raises(RemoteError) as refused:
            list(remote.evaluate(request))
        assert refused.value.code == grpc.StatusCode.DATA_LOSS
        assert "no longer match the sha256s recorded at push" in str(refused.value)
        config_path.write_bytes(original)
        assert list(remote.evaluate(request))[-1].HasField("report")  # the untouched files load
