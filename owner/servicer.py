"""gRPC edge of the owner: authenticate, parse, call one OwnerService method, map errors to status codes."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import torch

from ..common.contract import TOKEN_METADATA_KEY, TOKEN_SCHEME
from ..common.examples import Example
from ..common.memory import peak_rss_bytes
from ..common.rpc import pb, pb_grpc
from ..common.scoring import EvaluationReport
from ..common.wire_tensors import WIRE_DTYPES, tensor_bytes
from .audit import note_tenant
from .limits import LimitExceeded, StreamSlots
from .representations import Represented
from .service import OwnerError, OwnerService, Progress
from .store import Store

log = logging.getLogger(__name__)
Handler = TypeVar("Handler", bound=Callable[..., Any])


def rpc(method: Handler) -> Handler:
    """Authenticates the caller, passes its tenant name, and turns OwnerError into a gRPC status."""

    @functools.wraps(method)
    def wrapper(self: OwnerServicer, request: Any, context: grpc.ServicerContext) -> Any:
        tenant = self.authenticate(context)
        try:
            result = method(self, tenant, request, context)
            if isinstance(result, Iterator):
                self.take_stream_slot(tenant, context)
                return _guard_stream(result, context, lambda: self.streams.release(tenant))
            return result
        except OwnerError as error:
            context.abort(getattr(grpc.StatusCode, error.code), str(error))

    return wrapper  # type: ignore[return-value]


def _guard_stream(stream: Iterator[Any], context: grpc.ServicerContext, on_end: Callable[[], None]) -> Iterator[Any]:
    try:
        yield from stream
    except OwnerError as error:
        context.abort(getattr(grpc.StatusCode, error.code), str(error))
    finally:
        on_end()


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
        peak_rss_bytes=peak_rss_bytes(),
    )


def encode_representation(result: Represented, dtype: str, log_probs: str, top_k: int) -> pb.RepresentResponse:
    """Raw little-endian tensors: compact, and exact in float32 (the client decodes with `decode_tensor`)."""
    positions, hidden_size = result.hidden.shape
    response = pb.RepresentResponse(
        positions=positions,
        hidden_size=hidden_size,
        dtype=dtype,
        hidden=tensor_bytes(result.hidden.to(WIRE_DTYPES[dtype])),
        vocab_size=result.log_probs.shape[-1],
    )
    if log_probs == "full":
        response.log_probs = tensor_bytes(result.log_probs)
    elif log_probs == "top_k":
        values, indices = result.log_probs.topk(top_k, dim=-1)
        response.top_k_ids = tensor_bytes(indices.to(torch.int32))
        response.top_k_log_probs = tensor_bytes(values)
    return response


class OwnerServicer(pb_grpc.ModelOwnerServicer):
    def __init__(self, service: OwnerService, store: Store):
        self.service = service
        self.store = store
        self.streams = StreamSlots(service.limits.max_streams)

    def take_stream_slot(self, tenant: str, context: grpc.ServicerContext) -> None:
        try:
            self.streams.acquire(tenant)
        except LimitExceeded as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    def authenticate(self, context: grpc.ServicerContext) -> str:
        """The tenant named by the bearer token, or else by the common name of a verified client certificate."""
        metadata = dict(context.invocation_metadata())
        header = metadata.get(TOKEN_METADATA_KEY, "")
        tenant = self.store.authenticate(header[len(TOKEN_SCHEME) :]) if header.startswith(TOKEN_SCHEME) else None
        if tenant is None and not header:
            # gRPC only fills x509_common_name for a certificate the server's client CA verified (mTLS).
            names = context.auth_context().get("x509_common_name", [])
            if len(names) == 1 and self.store.has_tenant(names[0].decode("utf-8", "replace")):
                tenant = names[0].decode()
        if tenant is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid tenant token or client certificate is required (offsite-owner tenants add, certs init)",
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
        return pb.ModelCard(emulators=offers, head=pb.ArtifactOffer(**card.pop("head")), **card)

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
        self.take_stream_slot(tenant, context)
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
        finally:
            self.streams.release(tenant)
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
        for event in self.service.evaluate(
            tenant, request.adapter_id, examples, request.use_owner_data, request.limit, request.batch_size
        ):
            if isinstance(event, Progress):
                yield pb.EvaluateEvent(progress=pb.Progress(done=event.done, total=event.total))
            else:
                yield pb.EvaluateEvent(report=report_to_pb(event))

    @rpc
    def Generate(
        self, tenant: str, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateEvent]:
        temperature = request.temperature if math.isfinite(request.temperature) else -1.0
        for token, text in self.service.generate(
            tenant,
            request.adapter_id,
            request.prompt,
            request.max_new_tokens,
            temperature,
            request.seed,
            request.planned_length,
        ):
            yield pb.GenerateEvent(text=text, token_id=token)
        yield pb.GenerateEvent(done=True)

    def Represent(
        self, request_iterator: Iterator[pb.RepresentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RepresentResponse]:
        tenant = self.authenticate(context)
        self.take_stream_slot(tenant, context)
        return _guard_stream(self._represent(tenant, request_iterator), context, lambda: self.streams.release(tenant))

    def _represent(self, tenant: str, requests: Iterator[pb.RepresentRequest]) -> Iterator[pb.RepresentResponse]:
        for request in requests:
            dtype = request.dtype or "float32"
            result = self.service.represent(
                tenant, list(request.token_ids), dtype, request.log_probs, request.top_k, request.last_only
            )
            yield encode_representation(result, dtype, request.log_probs, request.top_k)

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
