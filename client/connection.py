"""A connection to an owner daemon: channel, token, and one method per RPC."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from ..common.contract import MAX_MESSAGE_BYTES, TOKEN_METADATA_KEY, TOKEN_SCHEME
from ..common.rpc import pb, pb_grpc

TOKEN_ENVIRONMENT = "OFFSITE_TOKEN"
Response = TypeVar("Response")


class RemoteError(RuntimeError):
    """The owner refused or failed a call; the message carries its status and explanation."""

    def __init__(self, error: grpc.RpcError):
        self.code = error.code()
        super().__init__(f"{self.code.name}: {error.details()}")


class Remote:
    def __init__(self, server: str, token: str | None = None, timeout: float | None = None):
        token = token or os.environ.get(TOKEN_ENVIRONMENT)
        if not token:
            raise ValueError(f"no tenant token: pass --token or set {TOKEN_ENVIRONMENT}")
        self.channel = grpc.insecure_channel(
            server,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = pb_grpc.ModelOwnerStub(self.channel)
        self.metadata = ((TOKEN_METADATA_KEY, TOKEN_SCHEME + token),)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., Response], request: object) -> Response:
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise RemoteError(error) from None

    def _stream(self, method: Callable[..., Iterator[Response]], request: object) -> Iterator[Response]:
        try:
            yield from method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise RemoteError(error) from None

    def model_card(self) -> pb.ModelCard:
        return self._unary(self.stub.GetModelCard, pb.GetModelCardRequest())

    def pull(self, artifact: str, name: str, offset: int) -> Iterator[pb.ArtifactChunk]:
        """Raw chunks; the caller handles grpc.RpcError itself, to resume transient failures."""
        request = pb.PullArtifactRequest(artifact=artifact, file=name, offset=offset)
        return self.stub.PullArtifact(request, metadata=self.metadata, timeout=self.timeout)

    def push(self, messages: Iterator[pb.PushAdapterRequest]) -> pb.PushAdapterResponse:
        return self._unary(self.stub.PushAdapter, messages)

    def evaluate(self, request: pb.EvaluateRequest) -> Iterator[pb.EvaluateEvent]:
        return self._stream(self.stub.Evaluate, request)

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateEvent]:
        return self._stream(self.stub.Generate, request)

    def list_adapters(self) -> pb.ListAdaptersResponse:
        return self._unary(self.stub.ListAdapters, pb.ListAdaptersRequest())

    def delete_adapter(self, adapter_id: str) -> pb.DeleteAdapterResponse:
        return self._unary(self.stub.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id))
