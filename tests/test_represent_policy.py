"""The owner's representation policy (issue 16, finding 10): Represent and the head artifact can be turned off,
log-probs are top-k only by default, each tenant has a budget of positions per window, and the model card says so."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import TINY_LAYOUT, InProcessOwner

from offsite.client.connection import RemoteError
from offsite.client.pull import pull_head
from offsite.common.model_loading import load_model
from offsite.common.rpc import pb
from offsite.owner.cli import describe_policy, parser, represent_policy, serve_settings
from offsite.owner.config import ConfigError, resolve
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.server import start_server
from offsite.owner.service import BudgetExceeded, OwnerService, RepresentPolicy, TokenBudget
from offsite.owner.servicer import RETRY_AFTER_METADATA_KEY
from offsite.owner.store import Store

Serve = Callable[[RepresentPolicy], InProcessOwner]


@pytest.fixture
def serve(tiny_model_dir, tmp_path: Path) -> Iterator[Serve]:
    """An in-process owner with the policy given; the tiny model and its emulator are loaded once per test."""
    started: list[InProcessOwner] = []
    loaded = load_model(str(tiny_model_dir("llama")))

    def start(policy: RepresentPolicy) -> InProcessOwner:
        store = Store(tmp_path / f"store-{len(started)}")
        token = store.add_tenant("alice")
        store.add_tenant("bob")
        spec = EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")
        service = OwnerService(loaded, store, [spec], represent_policy=policy)
        server, port = start_server(service, store, "127.0.0.1:0")
        started.append(InProcessOwner(service, store, f"127.0.0.1:{port}", token, server))
        return started[-1]

    yield start
    for owner in started:
        owner.server.stop(None)
        owner.store.close()


def _represent(owner: InProcessOwner, token: str | None = None, **fields: object) -> pb.RepresentResponse:
    with owner.remote(token) as remote:
        [response] = list(remote.represent(iter([pb.RepresentRequest(**fields)])))  # type: ignore[arg-type]
    return response


def _refused(owner: InProcessOwner, **fields: object) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        _represent(owner, **fields)
    return refused.value


def test_by_default_log_probs_are_top_k_only_and_a_request_for_more_names_the_option(
    owner: InProcessOwner,
) -> None:
    assert owner.service.represent_policy == RepresentPolicy()  # the conftest owner passes no policy
    ids = [5, 6, 7, 8]
    for fields in ({"log_probs": "full"}, {"log_probs": "full", "last_only": True}):
        error = _refused(owner, token_ids=ids, **fields)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "represent_log_probs" in str(error) and "'top_k'" in str(error)
    error = _refused(owner, token_ids=ids, log_probs="top_k", top_k=21)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "represent_top_k of 20" in str(error)
    top = _represent(owner, token_ids=ids, log_probs="top_k", top_k=20)
    assert top.positions == len(ids) and len(top.top_k_ids) == len(ids) * 20 * 4 and not top.log_probs
    assert _represent(owner, token_ids=ids).positions == len(ids)  # states alone


def test_a_none_policy_serves_states_without_log_probs_and_full_serves_everything(serve: Serve) -> None:
    strict = serve(RepresentPolicy(log_probs="none"))
    error = _refused(strict, token_ids=[5, 6], log_probs="top_k", top_k=1)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "represent_log_probs is 'none'" in str(error)
    assert _represent(strict, token_ids=[5, 6]).positions == 2
    assert not _represent(strict, token_ids=[5, 6]).top_k_ids

    open_ = serve(RepresentPolicy(log_probs="full", max_top_k=100))
    full = _represent(open_, token_ids=[5, 6], log_probs="full")
    assert len(full.log_probs) == 2 * full.vocab_size * 4
    assert _represent(open_, token_ids=[5], log_probs="top_k", top_k=100).top_k_ids


def test_represent_and_the_head_artifact_can_be_turned_off_and_the_card_says_so(serve: Serve, tmp_path: Path) -> None:
    owner = serve(RepresentPolicy(represent=False, head_artifact=False, token_budget=0))
    with owner.remote() as remote:
        card = remote.model_card()
    assert card.HasField("represent_policy") and not card.HasField("head")
    policy = card.represent_policy
    assert (policy.represent, policy.head_artifact, policy.log_probs, policy.token_budget) == (False, False, "top_k", 0)
    error = _refused(owner, token_ids=[5, 6])
    assert error.code == grpc.StatusCode.PERMISSION_DENIED and "--no-represent" in str(error)
    with owner.remote() as remote, pytest.raises(grpc.RpcError) as pulled:
        list(remote.pull("head", "offsite.json", 0))
    assert pulled.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--no-head-artifact" in pulled.value.details()
    with owner.remote() as remote, pytest.raises(ValueError, match="no head artifact"):
        pull_head(remote, tmp_path / "head", show_progress=False)
    assert not (tmp_path / "head").exists()
    with owner.remote() as remote:  # the emulators are still offered
        assert [e.id for e in remote.model_card().emulators] == [f"uniform-{TINY_LAYOUT}"]


def test_the_default_card_shows_the_default_policy(owner: InProcessOwner) -> None:
    with owner.remote() as remote:
        card = remote.model_card()
    policy = card.represent_policy
    assert card.head.id == "head" and policy.represent and policy.head_artifact
    assert (policy.log_probs, policy.max_top_k) == ("top_k", 20)
    assert policy.token_budget == RepresentPolicy().token_budget > 0
    assert policy.budget_window_seconds == RepresentPolicy().budget_window_seconds


def test_a_tenant_past_its_budget_is_refused_with_a_retry_hint_and_others_are_not(serve: Serve) -> None:
    owner = serve(RepresentPolicy(token_budget=10, budget_window_seconds=3600))
    _represent(owner, token_ids=list(range(3, 11)))  # 8 positions
    _represent(owner, token_ids=list(range(3, 30)), last_only=True)  # 1 position: the budget counts what is returned
    with owner.remote() as remote:
        call = remote.stub.Represent(iter([pb.RepresentRequest(token_ids=[4, 5])]), metadata=remote.metadata)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "represent_token_budget" in refused.value.details() and "retry in" in refused.value.details()
    trailing = dict(refused.value.trailing_metadata())
    assert 3590 <= int(trailing[RETRY_AFTER_METADATA_KEY]) <= 3600
    assert _represent(owner, token_ids=[4]).positions == 1  # the 10th position still fits
    bob = owner.store.add_tenant("carol")
    assert _represent(owner, token=bob, token_ids=[4, 5, 6]).positions == 3  # carol has her own budget


def test_the_budget_slides_the_oldest_positions_out_of_the_window() -> None:
    now = [0.0]
    budget = TokenBudget(10, 60.0, clock=lambda: now[0])
    budget.take("alice", 6)
    now[0] = 20.0
    budget.take("alice", 4)
    with pytest.raises(BudgetExceeded) as refused:
        budget.take("alice", 3)
    assert refused.value.retry_after == pytest.approx(40.0)  # when the first 6 expire
    now[0] = 59.0
    with pytest.raises(BudgetExceeded):
        budget.take("alice", 1)
    now[0] = 60.0
    budget.take("alice", 6)
    with pytest.raises(BudgetExceeded, match="more than this owner's represent_token_budget"):
        budget.take("bob", 11)  # can never fit
    TokenBudget(0, 60.0).take("alice", 10**9)  # 0: no budget


def _serve_namespace(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(["serve", "--store", "/s", *argv])
    return serve_settings(args).namespace()


def test_serve_flags_and_config_keys_build_the_policy(tmp_path: Path) -> None:
    assert represent_policy(_serve_namespace([])) == RepresentPolicy()
    flags = [
        "--no-represent",
        "--no-head-artifact",
        "--represent-log-probs",
        "none",
        "--represent-top-k",
        "5",
        "--represent-token-budget",
        "0",
        "--represent-budget-window-seconds",
        "60",
    ]
    assert represent_policy(_serve_namespace(flags)) == RepresentPolicy(False, False, "none", 5, 0, 60.0)
    config = tmp_path / "owner.toml"
    config.write_text('store = "s"\nrepresent_log_probs = "full"\nhead_artifact = false\nrepresent_token_budget = 7\n')
    from_file = represent_policy(resolve({}, config, environ={}).namespace())
    assert from_file == RepresentPolicy(head_artifact=False, log_probs="full", token_budget=7)
    for bad in ('represent_log_probs = "all"', "represent_token_budget = -1", "represent_top_k = 0"):
        config.write_text(f'store = "s"\n{bad}\n')
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            resolve({}, config, environ={})
    assert "log-probs top_k (k ≤ 20)" in describe_policy(RepresentPolicy())
    assert describe_policy(RepresentPolicy(represent=False, head_artifact=False)) == "off; head artifact off"
