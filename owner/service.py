"""The owner's core, free of gRPC: what each RPC does, given an authenticated tenant.

The servicer parses requests, calls one method here, and maps `OwnerError.code` to a gRPC status.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..common.adapter_format import PEMA
from ..common.architectures import depth
from ..common.contract import (
    ADAPTER_FILE_NAMES,
    CHUNK_BYTES,
    CONTEXT_FALLBACK,
    DEFAULT_MAX_LENGTH,
    DELIVERIES,
    HEAD_ARTIFACT,
    HEAD_FORMAT,
    MANIFEST_NAME,
    MAX_ADAPTER_BYTES,
    MAX_ADAPTER_FILES,
    MAX_CHOICES,
    MAX_CHUNK_BYTES,
    MAX_EVAL_BATCH_TOKENS,
    MAX_EVAL_EXAMPLES,
    MAX_EVAL_FORWARDS,
    MAX_MESSAGE_BYTES,
    MAX_NEW_TOKENS,
    MAX_REPRESENT_TOKENS,
    MAX_TOP_K,
    MESSAGE_OVERHEAD_BYTES,
    PLUG_IN,
    PROXY,
    REPRESENT_DTYPES,
    REPRESENT_LOG_PROBS,
)
from ..common.examples import DataError, Example, encode
from ..common.generation.loop import Piece, model_policy, stream
from ..common.generation.sampling import SamplingConfig
from ..common.generation.steppers import stepper_for
from ..common.manifest import BundleError, read_manifest, verify_bundle, write_manifest
from ..common.model_loading import LoadedModel, fingerprint, tokenizer_sha256
from ..common.pema.bundle import load_pema
from ..common.pema.head import Head
from ..common.pema.policy import pema_policy
from ..common.proxy_tuning import ProxyTuned
from ..common.scoring import EvaluationReport, Progress, evaluation_steps
from ..common.signing import public_key_hex
from .adapters.delivery import DeliveryRefused, check_proxy, proxy_tuned, requested_delivery
from .adapters.plugin import EmulatorOnlyAdapter, plug
from .adapters.validation import AdapterRejected, Check, validate_adapter
from .config import (
    DEFAULT_LOG_PROBS_POLICY,
    DEFAULT_REPRESENT_BUDGET_WINDOW_SECONDS,
    DEFAULT_REPRESENT_TOKEN_BUDGET,
    DEFAULT_REPRESENT_TOP_K,
    LOG_PROBS_POLICIES,
)
from .emulator import EmulatorSpec, build_emulator
from .emulator.report_card import check_release
from .limits import BudgetExceeded, LimitExceeded, TenantLimits, TokenBudget, TokenRate
from .model_queue import CallEnded, Job, ModelQueue, ModelQueueFull
from .representations import ALL_LOG_PROBS, LAST_LOG_PROBS, NO_LOG_PROBS, RepresentationBatcher, Represented
from .store import AdapterRecord, Store, TamperedAdapter, content_id, new_record

log = logging.getLogger(__name__)
PLUGGED_CACHE_SIZE = 2
Step = TypeVar("Step")
WIRE_WIDTHS = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes per value of a Represent dtype
TOP_K_ENTRY_BYTES = 8  # an int32 id and a float32 log-prob


def context_length(config: Any) -> int | None:
    """The most positions the model takes, where its config says (Bloom's ALiBi names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _represent_response_bytes(
    positions: int, hidden_size: int, vocab: int, dtype: str, log_probs: str, top_k: int
) -> int:
    """The tensor bytes of one RepresentResponse, known before any forward runs."""
    size = positions * hidden_size * WIRE_WIDTHS[dtype]
    if log_probs == "full":
        size += positions * vocab * WIRE_WIDTHS["float32"]
    elif log_probs == "top_k":
        size += positions * top_k * TOP_K_ENTRY_BYTES
    return size


@dataclass(frozen=True)
class RepresentPolicy:
    """What Represent and the head artifact give a tenant; the owner sets it with `serve` options.

    The full model's final-layer states and log-probs are what a tenant needs to distil the emulator's compressed
    middle against the full model, or to recover the head from logits (issue 16, finding 10): each can be turned off,
    log-probs are top-k only unless the owner allows the whole distribution, and each tenant gets a budget of
    positions per window.
    """

    represent: bool = True
    head_artifact: bool = True
    log_probs: str = DEFAULT_LOG_PROBS_POLICY  # none, top_k or full: the most a request may ask for
    max_top_k: int = DEFAULT_REPRESENT_TOP_K
    token_budget: int = DEFAULT_REPRESENT_TOKEN_BUDGET  # positions returned per window and tenant; 0: no budget
    budget_window_seconds: float = DEFAULT_REPRESENT_BUDGET_WINDOW_SECONDS

    def __post_init__(self) -> None:
        if self.log_probs not in LOG_PROBS_POLICIES:
            raise ValueError(f"log_probs must be one of {', '.join(LOG_PROBS_POLICIES)}, not {self.log_probs!r}")
        if not 1 <= self.max_top_k <= MAX_TOP_K or self.token_budget < 0 or not self.budget_window_seconds > 0:
            raise ValueError("max_top_k must be in 1..MAX_TOP_K, the budget not negative, the window positive")

    def check(self, log_probs: str, top_k: int) -> None:
        """Refuses a request for more log-probs than the policy allows, naming the option that allows it."""
        asked = log_probs or "none"
        if LOG_PROBS_POLICIES.index(asked) > LOG_PROBS_POLICIES.index(self.log_probs):
            raise invalid(
                f"log_probs {asked!r} is refused by this owner's policy: represent_log_probs is {self.log_probs!r} "
                f"(serve --represent-log-probs {asked} would allow it)"
            )
        if asked == "top_k" and top_k > self.max_top_k:
            raise invalid(f"top_k {top_k} is over this owner's represent_top_k of {self.max_top_k}")

    def card(self) -> dict[str, Any]:
        return {
            "represent": self.represent,
            "head_artifact": self.head_artifact,
            "log_probs": self.log_probs,
            "max_top_k": self.max_top_k,
            "token_budget": self.token_budget,
            "budget_window_seconds": self.budget_window_seconds,
        }


class OwnerError(Exception):
    """An error the client caused or must know about; `code` names the gRPC status."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after  # seconds, where waiting helps (a budget), sent as trailing metadata


def invalid(message: str) -> OwnerError:
    return OwnerError("INVALID_ARGUMENT", message)


def _delivery(requested: str, adapter_id: str) -> str:
    try:
        return requested_delivery(requested, adapter_id)
    except ValueError as error:
        raise invalid(str(error)) from None


@dataclass
class Artifact:
    """A signed bundle the owner offers through PullArtifact."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        return (
            sum(int(f["size"]) for f in self.manifest["files"].values())
            + (self.directory / MANIFEST_NAME).stat().st_size
        )

    @property
    def files(self) -> list[str]:
        return [MANIFEST_NAME, *sorted(self.manifest["files"])]


@dataclass
class Emulator(Artifact):
    spec: EmulatorSpec = field(kw_only=True)


@dataclass
class PushResult:
    adapter_id: str
    method: str
    bytes: int
    parameters: int
    checks: list[Check]
    already_stored: bool


class OwnerService:
    def __init__(
        self,
        loaded: LoadedModel,
        store: Store,
        emulators: Iterable[EmulatorSpec],
        owner_examples: list[Example] | None = None,
        eval_batch_size: int = 16,
        max_adapter_bytes: int = MAX_ADAPTER_BYTES,
        release_margin: float | None = None,
        limits: TenantLimits | None = None,
        represent_policy: RepresentPolicy | None = None,
        model_queue: ModelQueue | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.loaded = loaded
        self.chunk_bytes = chunk_bytes  # per PullArtifact chunk
        self.model_queue = model_queue or ModelQueue()  # every forward of the full model runs there, in turns
        self.represent_policy = represent_policy or RepresentPolicy()
        policy = self.represent_policy
        self.represent_budget = TokenBudget(policy.token_budget, policy.budget_window_seconds)
        self.release_margin = release_margin
        self.limits = limits or TenantLimits()
        self.store = store
        self.key = store.signing_key()
        self.public_key = public_key_hex(self.key)
        self.fingerprint = fingerprint(loaded.model)
        self.tokenizer_sha256 = tokenizer_sha256(loaded.tokenizer)
        self.owner_examples = owner_examples or []
        self.eval_batch_size = eval_batch_size
        self.max_adapter_bytes = max_adapter_bytes
        self.emulators = {spec.id: self._prepare_emulator(spec) for spec in emulators}
        self.head = self._prepare_head()
        self.representations = RepresentationBatcher(loaded.model)
        self.represent_rate = TokenRate(self.limits.represent_tokens_per_second)
        self._plugged: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()  # by (adapter id, delivery)
        self._plug_lock = threading.Lock()

    def _prepare_emulator(self, spec: EmulatorSpec) -> Emulator:
        """Reuses a stored bundle of this base model when it still verifies; builds it otherwise.

        Raises ReleaseRefused when the release gate finds the emulator too close to the full model.
        """
        directory = self.store.emulator_dir(self.fingerprint, spec.id)
        manifest = None
        if directory.is_dir():
            try:
                manifest = verify_bundle(directory, self.public_key)
            except BundleError as error:
                log.warning("rebuilding emulator %s: %s", spec.id, error)
            if manifest is not None and "report_card" not in manifest:
                log.warning("rebuilding emulator %s: it predates report cards", spec.id)
                manifest = None
        if manifest is None:
            log.info("building emulator %s", spec.id)
            manifest = build_emulator(
                self.loaded.model, self.loaded.tokenizer, spec, directory, self.key, self.fingerprint, self.loaded.name
            )
        check_release(spec.id, manifest["report_card"], self.release_margin)
        return Emulator(directory, manifest, spec=spec)

    def _prepare_head(self) -> Artifact:
        """The LM head, true final norm and tokenizer as a signed bundle, written once per base model."""
        directory = self.store.root / "heads" / self.fingerprint[:16]
        if directory.is_dir():
            try:
                return Artifact(directory, verify_bundle(directory, self.public_key))
            except BundleError as error:
                log.warning("rewriting the head artifact: %s", error)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        Head.from_model(self.loaded.model).save(partial)
        self.loaded.tokenizer.save_pretrained(partial)
        body = {
            "format": HEAD_FORMAT,
            "base_model": self.loaded.name,
            "base_fingerprint": self.fingerprint,
            "architecture": self.loaded.model.config.model_type,
        }
        manifest = write_manifest(partial, body, self.key)
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        return Artifact(directory, manifest)

    def artifacts(self) -> dict[str, Artifact]:
        """What an adapter may be trained on: the emulators and the head (PEMA), offered or not."""
        return {**self.emulators, HEAD_ARTIFACT: self.head}

    def pullable(self) -> dict[str, Artifact]:
        """What PullArtifact serves: the head only where the policy offers it."""
        return self.artifacts() if self.represent_policy.head_artifact else dict(self.emulators)

    # GetModelCard

    def model_card(self) -> dict[str, Any]:
        config = self.loaded.model.config
        return {
            "model_name": self.loaded.name,
            "architecture": config.model_type,
            "depth": depth(config),
            "hidden_size": int(config.hidden_size),
            "vocab_size": int(config.vocab_size),
            "tokenizer_sha256": self.tokenizer_sha256,
            "base_fingerprint": self.fingerprint,
            "owner_public_key": self.public_key,
            "max_adapter_bytes": self.max_adapter_bytes,
            "chunk_bytes": self.chunk_bytes,
            "emulators": [
                {
                    "id": e.spec.id,
                    "method": e.spec.method,
                    "layout": str(e.spec.layout),
                    "parameters": int(e.manifest["parameters"]),
                    "bytes": e.bytes,
                    "files": e.files,
                    "report_card": {
                        k: e.manifest["report_card"][k]
                        for k in ("perplexity", "full_perplexity", "perplexity_ratio", "windows")
                    },
                }
                for e in self.emulators.values()
            ],
            "head": (
                {"id": HEAD_ARTIFACT, "bytes": self.head.bytes, "files": self.head.files}
                if self.represent_policy.head_artifact
                else None
            ),
            "represent_policy": self.represent_policy.card(),
        }

    # PullArtifact

    def artifact_chunks(self, artifact: str, name: str, offset: int) -> Iterator[tuple[int, bytes, int, str]]:
        """(offset, data, file size, file sha256) for one file of an artifact, from `offset` on."""
        offered = self.pullable()
        emulator = offered.get(artifact)
        if emulator is None and artifact == HEAD_ARTIFACT:
            raise OwnerError(
                "PERMISSION_DENIED", "this owner does not offer the head artifact (serve --no-head-artifact)"
            )
        if emulator is None:
            raise OwnerError("NOT_FOUND", f"no artifact {artifact!r}; offered: {', '.join(sorted(offered))}")
        if name not in emulator.files:
            raise OwnerError("NOT_FOUND", f"artifact {artifact} has no file {name!r}")
        path = emulator.directory / name
        size = path.stat().st_size
        if offset < 0 or offset > size:
            raise OwnerError("OUT_OF_RANGE", f"offset {offset} is outside {name} (0..{size})")
        digest = (
            hashlib.sha256(path.read_bytes()).hexdigest()
            if name == MANIFEST_NAME
            else emulator.manifest["files"][name]["sha256"]
        )
        with path.open("rb") as handle:
            handle.seek(offset)
            position = offset
            while True:
                data = handle.read(self.chunk_bytes)
                if not data and position != offset:
                    return
                yield position, data, size, digest
                position += len(data)
                if not data:
                    return

    # PushAdapter

    def push_adapter(
        self, tenant: str, emulator_id: str, files: list[tuple[str, int, str]], chunks: Iterator[tuple[str, int, bytes]]
    ) -> PushResult:
        """Receives the declared files into staging, checks sizes and hashes, validates, stores atomically."""
        emulator = self.artifacts().get(emulator_id)
        if emulator is None:
            raise invalid(f"unknown emulator {emulator_id!r}; offered: {', '.join(sorted(self.artifacts()))}")
        declared = self._check_declared_files(files)
        adapter_id = content_id({n: d[1] for n, d in declared.items()})  # re-checked on every load
        if self.store.get_adapter(tenant, adapter_id) is None:
            incoming = sum(size for size, _ in declared.values())
            try:
                self.limits.check_quota(tenant, *self.store.usage(tenant), incoming)  # before receiving a byte
            except LimitExceeded as error:
                raise OwnerError("RESOURCE_EXHAUSTED", str(error)) from None
        with self.store.staging() as staged:
            self._receive(staged, declared, chunks)
            try:
                validated = validate_adapter(staged, self.loaded.model, emulator.manifest, self.fingerprint)
                manifest = read_manifest(staged)
            except (AdapterRejected, BundleError) as error:
                raise invalid(str(error)) from None
            if manifest.get("emulator") != emulator_id:
                raise invalid(f"{MANIFEST_NAME}: trained on {manifest.get('emulator')!r}, pushed for {emulator_id!r}")
            size = sum(d[0] for d in declared.values())
            record = new_record(tenant, adapter_id, validated.method, emulator_id, size, validated.parameters)
            try:
                added = self.store.commit_adapter(tenant, staged, record, self.limits)
            except LimitExceeded as error:
                raise OwnerError("RESOURCE_EXHAUSTED", str(error)) from None
        return PushResult(adapter_id, validated.method, size, validated.parameters, validated.checks, not added)

    def _check_declared_files(self, files: list[tuple[str, int, str]]) -> dict[str, tuple[int, str]]:
        if not files:
            raise invalid("the header lists no files")
        if len(files) > MAX_ADAPTER_FILES:
            raise invalid(f"the header lists {len(files)} files; at most {MAX_ADAPTER_FILES}")
        declared: dict[str, tuple[int, str]] = {}
        for name, size, digest in files:
            if name not in ADAPTER_FILE_NAMES:
                raise invalid(f"file name {name!r} is not allowed; allowed: {', '.join(sorted(ADAPTER_FILE_NAMES))}")
            if name in declared:
                raise invalid(f"file {name} is listed twice")
            if size < 0:
                raise invalid(f"file {name} has a negative size")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise invalid(f"file {name}: sha256 must be 64 lowercase hex digits")
            declared[name] = (size, digest)
        total = sum(size for size, _ in declared.values())
        if total > self.max_adapter_bytes:
            raise invalid(f"adapter of {total} bytes exceeds the cap of {self.max_adapter_bytes} bytes")
        return declared

    @staticmethod
    def _receive(staged: Path, declared: dict[str, tuple[int, str]], chunks: Iterator[tuple[str, int, bytes]]) -> None:
        written = dict.fromkeys(declared, 0)
        handles = {name: (staged / name).open("wb") for name in declared}
        digests = {name: hashlib.sha256() for name in declared}
        try:
            for name, offset, data in chunks:
                if name not in declared:
                    raise invalid(f"chunk for undeclared file {name!r}")
                if len(data) > MAX_CHUNK_BYTES:
                    raise invalid(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
                if offset != written[name]:
                    raise invalid(
                        f"chunk of {name} at offset {offset}, expected {written[name]} (chunks must be in order)"
                    )
                if written[name] + len(data) > declared[name][0]:
                    raise invalid(f"{name} is larger than its declared {declared[name][0]} bytes")
                handles[name].write(data)
                digests[name].update(data)
                written[name] += len(data)
        finally:
            for handle in handles.values():
                handle.close()
        for name, (size, digest) in declared.items():
            if written[name] != size:
                raise invalid(f"{name}: received {written[name]} of {size} bytes (truncated stream)")
            if digests[name].hexdigest() != digest:
                raise invalid(f"{name}: sha256 of the received bytes does not match the header")

    # Evaluate / Generate

    def _verified_adapter_dir(self, adapter_id: str) -> Path:
        """Re-hashes a stored adapter before it is loaded: a file changed on disk since the push is refused."""
        try:
            return self.store.verified_adapter_dir(adapter_id)
        except TamperedAdapter as error:
            log.error("%s", error)
            raise OwnerError("DATA_LOSS", str(error)) from None

    def _model_for(self, tenant: str, adapter_id: str, delivery: str = PLUG_IN) -> torch.nn.Module:
        if not adapter_id:
            return self.loaded.model
        record = self.store.get_adapter(tenant, adapter_id)
        if record is None:
            raise OwnerError("NOT_FOUND", f"no adapter {adapter_id}")
        if record.method == PEMA and delivery == PLUG_IN:
            raise OwnerError(
                "FAILED_PRECONDITION", "a PEMA adapter serves Generate; Evaluate scores LoRA and full ones"
            )
        key = (adapter_id, delivery)
        with self._plug_lock:
            if key in self._plugged:
                self._plugged.move_to_end(key)
                return self._plugged[key]
            if delivery == PROXY:
                model = self._proxy_tuned(record)
            else:
                try:
                    model = plug(self.loaded.model, self._verified_adapter_dir(adapter_id), record.method)
                except EmulatorOnlyAdapter as error:
                    raise OwnerError(
                        "FAILED_PRECONDITION", f"{error}: it fits the emulator only; ask for delivery {PROXY}"
                    ) from None
            self._plugged[key] = model
            while len(self._plugged) > PLUGGED_CACHE_SIZE:
                self._plugged.popitem(last=False)
            return model

    def _proxy_tuned(self, record: AdapterRecord) -> ProxyTuned:
        emulator_dir = self.store.emulator_dir(self.fingerprint, record.emulator)
        try:
            check_proxy(record, emulator_dir)
            return proxy_tuned(self.loaded.model, emulator_dir, self._verified_adapter_dir(record.id), self.public_key)
        except DeliveryRefused as error:
            raise OwnerError("FAILED_PRECONDITION", str(error)) from None

    def evaluate(
        self,
        tenant: str,
        adapter_id: str,
        examples: list[Example],
        use_owner_data: bool,
        limit: int,
        batch_size: int,
        stop: threading.Event | None = None,
        delivery: str = "",
    ) -> Iterator[Progress | EvaluationReport]:
        """Progress events, then the report, one batch per turn in the model queue.

        Setting `stop` (the call ended) drops the evaluation while it waits, or stops it after its running batch.
        """
        delivery = _delivery(delivery, adapter_id)
        if use_owner_data and examples:
            raise invalid("send examples or ask for the owner's data, not both")
        chosen = self.owner_examples if use_owner_data else examples
        if use_owner_data and not chosen:
            raise OwnerError("FAILED_PRECONDITION", "this owner has no validation set (serve --eval-data)")
        if not chosen:
            raise invalid("no examples to evaluate")
        if limit < 0 or batch_size < 0:
            raise invalid("limit and batch_size must not be negative")
        chosen = chosen[:limit] if limit else chosen
        if len(chosen) > MAX_EVAL_EXAMPLES:
            raise invalid(f"{len(chosen)} examples; at most {MAX_EVAL_EXAMPLES} per request")
        for index, example in enumerate(chosen):
            try:
                example.validate(f"example {index}")
            except DataError as error:
                raise invalid(str(error)) from None
            if len(example.choices) > MAX_CHOICES:
                raise invalid(f"example {index} has {len(example.choices)} choices; at most {MAX_CHOICES}")
        # Each choice of an example may be scored as its own sequence: bound the sequences, not only the examples.
        forwards = sum(len(e.choices) if e.choices and not e.text else 1 for e in chosen)
        if forwards > MAX_EVAL_FORWARDS:
            raise invalid(f"the examples need up to {forwards} scored sequences; at most {MAX_EVAL_FORWARDS}")
        max_length = min(DEFAULT_MAX_LENGTH, context_length(self.loaded.model.config) or DEFAULT_MAX_LENGTH)
        most = max(1, MAX_EVAL_BATCH_TOKENS // max_length)
        if batch_size > most:
            raise invalid(
                f"batch_size {batch_size} is too large: at most {most} sequences of up to {max_length} tokens "
                f"({MAX_EVAL_BATCH_TOKENS} tokens) per forward"
            )

        def steps() -> Iterator[Progress | EvaluationReport]:
            model = self._model_for(tenant, adapter_id, delivery)  # plugging copies weights: model work, in the queue
            batch = batch_size or min(self.eval_batch_size, most)
            yield from evaluation_steps(model, self.loaded.tokenizer, chosen, batch_size=batch, max_length=max_length)

        yield from self._queued(tenant, steps(), stop)

    def generate(
        self,
        tenant: str,
        adapter_id: str,
        prompt: str,
        sampling: SamplingConfig,
        planned_length: int = 0,
        stop: threading.Event | None = None,
        delivery: str = "",
    ) -> Iterator[Piece]:
        """One piece per token, one token per turn in the model queue; `stop` (the call ended) drops the rest."""
        delivery = _delivery(delivery, adapter_id)
        try:
            sampling.check()
        except ValueError as error:
            raise invalid(str(error)) from None
        if not 0 <= planned_length <= MAX_NEW_TOKENS:
            raise invalid(f"planned_length must be in 0..{MAX_NEW_TOKENS} (0: max_new_tokens)")
        prompt_ids = encode(self.loaded.tokenizer, prompt, special=True) if prompt else []
        if not prompt_ids:
            raise invalid("empty prompt")
        context = context_length(self.loaded.model.config) or CONTEXT_FALLBACK
        if len(prompt_ids) + sampling.max_new_tokens > context:
            raise invalid(
                f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens {sampling.max_new_tokens} it must fit "
                f"the model's context of {context} tokens (at most {max(0, context - sampling.max_new_tokens)} "
                "prompt tokens)"
            )
        record = self.store.get_adapter(tenant, adapter_id) if adapter_id else None
        pema = record is not None and record.method == PEMA and delivery == PLUG_IN

        def steps() -> Iterator[Piece]:
            # In the first turn: loading a PEMA adapter or plugging one in is model work.
            if pema:
                adapter, config = load_pema(self._verified_adapter_dir(adapter_id))
                head = Head.from_model(self.loaded.model)
                model = self.loaded.model
                planned = [planned_length] if planned_length else None  # 0: the adapter predicts L from the prompt
                policy = pema_policy(adapter, head, config, sampling.max_new_tokens, planned)
            else:
                model, policy = self._model_for(tenant, adapter_id, delivery), model_policy
            stepper = stepper_for(model)
            eos_id = self.loaded.tokenizer.eos_token_id
            yield from stream(stepper, prompt_ids, policy, sampling, eos_id, self.loaded.tokenizer)

        return self._queued(tenant, steps(), stop)

    # Represent

    def represent(
        self,
        tenant: str,
        ids: list[int],
        dtype: str,
        log_probs: str,
        top_k: int,
        last_only: bool,
        stop: threading.Event | None = None,
    ) -> Represented:
        """Hidden states (and log-probs) of one token sequence; the servicer encodes them for the wire.

        The forward waits its turn in the model queue; `stop` (the call ended) drops it while it waits.
        """
        policy = self.represent_policy
        if not policy.represent:
            raise OwnerError("PERMISSION_DENIED", "this owner does not serve Represent (serve --no-represent)")
        if not ids:
            raise invalid("token_ids is empty")
        if len(ids) > MAX_REPRESENT_TOKENS:
            raise invalid(f"{len(ids)} tokens; at most {MAX_REPRESENT_TOKENS} per request")
        vocab = int(self.loaded.model.config.vocab_size)
        if min(ids) < 0 or max(ids) >= vocab:
            raise invalid(f"token ids must lie in 0..{vocab - 1}")
        if (dtype or "float32") not in REPRESENT_DTYPES:
            raise invalid(f"dtype must be one of {', '.join(REPRESENT_DTYPES)}")
        if log_probs not in REPRESENT_LOG_PROBS:
            raise invalid("log_probs must be '', 'full' or 'top_k'")
        if log_probs == "top_k" and not 1 <= top_k <= min(MAX_TOP_K, vocab):
            raise invalid(f"top_k must be in 1..{min(MAX_TOP_K, vocab)}")
        policy.check(log_probs, top_k)
        positions = 1 if last_only else len(ids)
        size = _represent_response_bytes(
            positions, int(self.loaded.model.config.hidden_size), vocab, dtype or "float32", log_probs, top_k
        )
        if size > MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES:  # refused before the work, not after
            raise invalid(
                f"the response would be {size} bytes, over the message limit of {MAX_MESSAGE_BYTES}; send fewer "
                "tokens, or ask for last_only or top_k log-probs"
            )
        with self._model_job(tenant, stop) as job:  # admitted first: a full queue charges no rate or budget
            try:
                self.represent_rate.take(tenant, len(ids))  # compute: every token is run
            except LimitExceeded as error:
                raise OwnerError("RESOURCE_EXHAUSTED", str(error)) from None
            try:
                self.represent_budget.take(tenant, positions)  # what is revealed: the positions returned
            except BudgetExceeded as error:
                raise OwnerError("RESOURCE_EXHAUSTED", str(error), retry_after=error.retry_after) from None
            wanted = NO_LOG_PROBS if not log_probs else LAST_LOG_PROBS if last_only else ALL_LOG_PROBS
            with self.representations.pending(ids, wanted) as request:
                result = job.call(lambda: self.representations.run(request))
        return Represented(result.hidden[-1:], result.log_probs) if last_only else result

    # The model queue

    @contextmanager
    def _model_job(self, tenant: str, stop: threading.Event | None) -> Iterator[Job]:
        """A model-queue slot for one call, as OwnerErrors: a full queue, or a call that ended before its turn."""
        try:
            job = self.model_queue.admit(tenant, stop)
        except ModelQueueFull as error:
            raise OwnerError("RESOURCE_EXHAUSTED", str(error), retry_after=error.retry_after) from None
        try:
            yield job
        except CallEnded:
            raise OwnerError("CANCELLED", "the call ended before the model reached it") from None
        finally:
            job.cancel()

    def _queued(self, tenant: str, steps: Iterator[Step], stop: threading.Event | None) -> Iterator[Step]:
        with self._model_job(tenant, stop) as job:
            yield from job.stream(steps)

    # ListAdapters / DeleteAdapter

    def list_adapters(self, tenant: str) -> list[dict[str, Any]]:
        return [r.__dict__ for r in self.store.list_adapters(tenant)]

    def delete_adapter(self, tenant: str, adapter_id: str) -> None:
        if not self.store.delete_adapter(tenant, adapter_id):
            raise OwnerError("NOT_FOUND", f"no adapter {adapter_id}")
        with self._plug_lock:
            for delivery in DELIVERIES:
                self._plugged.pop((adapter_id, delivery), None)
