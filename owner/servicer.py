"""gRPC edge of the owner: authenticate, parse, call one OwnerService method, map errors to status codes."""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any, TypeVar

import grpc
import torch

from ..common.contract import TOKEN_METADATA_KEY, TOKEN_SCHEME
from ..common.examples import Example
from ..common.generation.sampling import SamplingConfig
from ..common.rpc import pb, pb_grpc
from ..common.scoring import EvaluationReport
from ..common.wire_tensors import WIRE_DTYPES, tensor_bytes
from .audit import note_tenant
from .certificates import CertificateError, peer_certificate
from .limits import LimitExceeded, ServerLimits, StreamDeadlines, StreamSlots, StreamWatch
from .representations import Represented
from .service import OwnerError, OwnerService, Progress
from .store import Store

log = logging.getLogger(__name__)
RETRY_AFTER_METADATA_KEY = "retry-after-seconds"  # trailing metadata of a RESOURCE_EXHAUSTED that waiting will lift
Handler = TypeVar("Handler", bound=Callable[..., Any])


def rpc(method: Handler) -> Handler:
    """Authenticates the caller, passes its tenant name, and turns OwnerError into a gRPC status.

    A server-streaming method's responses go through `OwnerServicer.streamed`: a stream slot, and deadlines.
    """

    @functools.wraps(method)
    def wrapper(self: OwnerServicer, request: Any, context: grpc.ServicerContext) -> Any:
        tenant = self.authenticate(context)
        try:
            result = method(self, tenant, request, context)
            if isinstance(result, Iterator):
                return self.streamed(tenant, context, result)
            return result
        except OwnerError as error:
            context.abort(getattr(grpc.StatusCode, error.code), str(error))

    return wrapper  # type: ignore[return-value]


def _abort(context: grpc.ServicerContext, error: OwnerError) -> None:
    if error.retry_after is not None:  # machine-readable, beside the message's "retry in N s"
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, f"{math.ceil(error.retry_after)}"),))
    context.abort(getattr(grpc.StatusCode, error.code), str(error))


def _send(responses: Iterator[Any], watch: StreamWatch, context: grpc.ServicerContext) -> Iterator[Any]:
    try:
        for response in responses:
            with watch.waiting():  # until gRPC asks for the next one: a slow reader is an idle client
                yield response
    except OwnerError as error:
        _abort(context, error)
    finally:
        # The responses' own cleanup (an evaluation joins its worker) runs before the slot is freed.
        close = getattr(responses, "close", None)
        if close is not None:
            close()


def ended_event(context: grpc.ServicerContext) -> threading.Event:
    """Set when the call ends, however it ends: the plain-Python side stops its work on it."""
    ended = threading.Event()
    if not context.add_callback(ended.set):
        ended.set()  # it has already ended
    return ended


def example_from_pb(message: pb.Example) -> Example:
    return Example(message.prompt, message.completion, tuple(message.choices), message.text)


def report_to_pb(report: EvaluationReport) -> pb.EvaluationReport:
    return pb.EvaluationReport(
        examples=report.examples,
        tokens=report.tokens,
        loss=report.loss,
        perplexity=report.perplexity,
        accuracy=report.accuracy,
        scored_choices=report.scored_choices,
        seconds=report.seconds,
        peak_rss_bytes=report.peak_rss_bytes,
        accuracy_norm=report.accuracy_norm,
        correct=report.correct,
    )


def encode_representation(
    result: Represented, dtype: str, log_probs: str, top_k: int, vocab_size: int
) -> pb.RepresentResponse:
    """Raw little-endian tensors: compact, and exact in float32 (the client decodes with `decode_tensor`)."""
    positions, hidden_size = result.hidden.shape
    response = pb.RepresentResponse(
        positions=positions,
        hidden_size=hidden_size,
        dtype=dtype,
        hidden=tensor_bytes(result.hidden.to(WIRE_DTYPES[dtype])),
        vocab_size=vocab_size,
    )
    if result.log_probs is None:
        return response
    if log_probs == "full":
        response.log_probs = tensor_bytes(result.log_probs)
    elif log_probs == "top_k":
        values, indices = result.log_probs.topk(top_k, dim=-1)
        response.top_k_ids = tensor_bytes(indices.to(torch.int32))
        response.top_k_log_probs = tensor_bytes(values)
    return response


class OwnerServicer(pb_grpc.ModelOwnerServicer):
    def __init__(self, service: OwnerService, store: Store, limits: ServerLimits | None = None):
        limits = limits or ServerLimits()
        self.service = service
        self.store = store
        self.streams = StreamSlots(service.limits.max_streams, limits.max_streams)
        self.deadlines = StreamDeadlines(limits.stream_idle_seconds, limits.stream_max_seconds)

    @contextmanager
    def stream_slot(self, tenant: str, context: grpc.ServicerContext) -> Iterator[StreamWatch]:
        """Holds one of the tenant's stream slots, with the call watched for its idle and overall deadlines."""
        try:
            self.streams.acquire(tenant)
        except LimitExceeded as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        watch = self.deadlines.watch(context.cancel)
        try:
            yield watch
        finally:
            self.deadlines.forget(watch)
            self.streams.release(tenant)

    def streamed(self, tenant: str, context: grpc.ServicerContext, responses: Iterator[Any]) -> Iterator[Any]:
        with self.stream_slot(tenant, context) as watch:
            yield from _send(responses, watch, context)

    def authenticate(self, context: grpc.ServicerContext) -> str:
        """The tenant of the call: named by its verified client certificate, by its bearer token, or both agreeing.

        The registry and the revoked serials are read on every call, so `tenants remove`/`rotate` and
        `certs revoke` take effect at the next call of a running daemon. A token never overrides a certificate:
        when both are presented they must name the same tenant.
        """
        try:
            certificate = peer_certificate(context.auth_context())
        except CertificateError as error:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if certificate is not None and self.store.is_revoked(certificate.serial):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"the client certificate (serial {certificate.serial:x}) is revoked"
            )
        header = dict(context.invocation_metadata()).get(TOKEN_METADATA_KEY, "")
        if header:
            token = header[len(TOKEN_SCHEME) :] if header.startswith(TOKEN_SCHEME) else ""
            tenant = self.store.authenticate(token) if token else None
            if tenant is not None and certificate is not None and certificate.tenant != tenant:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the bearer token and the client certificate ({certificate.tenant}) name different tenants",
                )
        elif certificate is not None and self.store.has_tenant(certificate.tenant):
            tenant = certificate.tenant
        else:
            tenant = None
        if tenant is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid tenant token or client certificate is required (offsite-owner tenants add, certs issue)",
            )
        note_tenant(tenant)
        return tenant

    @rpc
    def GetModelCard(self, tenant: str, request: pb.GetModelCardRequest, context: grpc.ServicerContext) -> pb.ModelCard:
        card = self.service.model_card()
        offers = [
            pb.EmulatorOffer(report_card=pb.ReportCard(**offer.pop("report_card")), **offer)
            for offer in card.pop("emulators")
        ]
        head = card.pop("head")  # None when the owner does not offer it: the field stays unset
        return pb.ModelCard(
            emulators=offers,
            head=pb.ArtifactOffer(**head) if head else None,
            represent_policy=pb.RepresentPolicy(**card.pop("represent_policy")),
            **card,
        )

    @rpc
    def PullArtifact(
        self, tenant: str, request: pb.PullArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ArtifactChunk]:
        for offset, data, size, digest in self.service.artifact_chunks(request.artifact, request.file, request.offset):
            yield pb.ArtifactChunk(file=request.file, offset=offset, data=data, file_size=size, file_sha256=digest)

    def PushAdapter(
        self, request_iterator: Iterator[pb.PushAdapterRequest], context: grpc.ServicerContext
    ) -> pb.PushAdapterResponse:
        tenant = self.authenticate(context)
        with self.stream_slot(tenant, context) as watch:
            return self._push_adapter(tenant, watch.requests(request_iterator), context)

    def _push_adapter(
        self, tenant: str, request_iterator: Iterator[pb.PushAdapterRequest], context: grpc.ServicerContext
    ) -> pb.PushAdapterResponse:
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise OwnerError("INVALID_ARGUMENT", "the stream must start with a header")
            header = first.header
            files = [(f.name, f.size, f.sha256) for f in header.files]

            def chunks() -> Iterator[tuple[str, int, bytes]]:
                for message in request_iterator:
                    if message.WhichOneof("part") != "chunk":
                        raise OwnerError("INVALID_ARGUMENT", "only one header is allowed, at the start")
                    yield message.chunk.file, message.chunk.offset, message.chunk.data

            result = self.service.push_adapter(tenant, header.emulator, files, chunks())
        except OwnerError as error:
            context.abort(getattr(grpc.StatusCode, error.code), str(error))
        return pb.PushAdapterResponse(
            adapter_id=result.adapter_id,
            method=result.method,
            bytes=result.bytes,
            parameters=result.parameters,
            checks=[pb.ValidationCheck(name=c.name, passed=c.passed, detail=c.detail) for c in result.checks],
            already_stored=result.already_stored,
        )

    @rpc
    def Evaluate(
        self, tenant: str, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EvaluateEvent]:
        examples = [example_from_pb(e) for e in request.examples]
        events = self.service.evaluate(
            tenant,
            request.adapter_id,
            examples,
            request.use_owner_data,
            request.limit,
            request.batch_size,
            ended_event(context),
            request.delivery,
        )
        with closing(events):  # closed when this stream is: the evaluation's work ends before its slot is freed
            for event in events:
                if isinstance(event, Progress):
                    yield pb.EvaluateEvent(progress=pb.Progress(done=event.done, total=event.total))
                else:
                    yield pb.EvaluateEvent(report=report_to_pb(event))

    @rpc
    def Generate(
        self, tenant: str, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateEvent]:
        sampling = SamplingConfig(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,  # unset on the wire: no nucleus filtering
            seed=request.seed,
            stop=tuple(request.stop),
        )
        pieces = self.service.generate(
            tenant,
            request.adapter_id,
            request.prompt,
            sampling,
            request.planned_length,
            ended_event(context),
            request.delivery,
        )
        tail, finish = "", ""
        with closing(pieces):  # closed when this stream is: its turn in the model queue is given up at once
            for piece in pieces:
                if piece.token is None:  # ended on end-of-text: any text held back goes with the done event
                    tail = piece.text
                else:
                    yield pb.GenerateEvent(text=piece.text, token_id=piece.token)
                finish = piece.finish or finish
        yield pb.GenerateEvent(done=True, text=tail, finish_reason=finish)

    def Represent(
        self, request_iterator: Iterator[pb.RepresentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RepresentResponse]:
        tenant = self.authenticate(context)
        return self._represent(tenant, request_iterator, context)

    def _represent(
        self, tenant: str, requests: Iterator[pb.RepresentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RepresentResponse]:
        with self.stream_slot(tenant, context) as watch:
            representations = self._representations(tenant, watch.requests(requests), ended_event(context))
            yield from _send(representations, watch, context)

    def _representations(
        self, tenant: str, requests: Iterator[pb.RepresentRequest], ended: threading.Event
    ) -> Iterator[pb.RepresentResponse]:
        vocab = int(self.service.loaded.model.config.vocab_size)
        for request in requests:
            dtype = request.dtype or "float32"
            result = self.service.represent(
                tenant, list(request.token_ids), dtype, request.log_probs, request.top_k, request.last_only, ended
            )
            yield encode_representation(result, dtype, request.log_probs, request.top_k, vocab)

    @rpc
    def ListAdapters(
        self, tenant: str, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(
            adapters=[
                pb.AdapterInfo(
                    adapter_id=a["id"],
                    method=a["method"],
                    emulator=a["emulator"],
                    bytes=a["bytes"],
                    parameters=a["parameters"],
                    created=a["created"],
                )
                for a in self.service.list_adapters(tenant)
            ]
        )

    @rpc
    def DeleteAdapter(
        self, tenant: str, request: pb.DeleteAdapterRequest, context: grpc.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        self.service.delete_adapter(tenant, request.adapter_id)
        return pb.DeleteAdapterResponse(deleted=True)
