"""A connection to an owner daemon: channel, token, and one method per RPC."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from ..common.addresses import is_loopback
from ..common.contract import (
    MAX_MESSAGE_BYTES,
    STREAM_DEADLINE_SECONDS,
    TOKEN_METADATA_KEY,
    TOKEN_SCHEME,
    UNARY_DEADLINE_SECONDS,
)
from ..common.rpc import pb, pb_grpc

TOKEN_ENVIRONMENT = "OFFSITE_TOKEN"
Response = TypeVar("Response")


def read_token_file(path: Path) -> str:
    """A token kept in a file (as `offsite-owner tenants add --token-file` writes it), so it never shows in `ps`."""
    token = path.read_text(encoding="utf-8").strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: expected one tenant token on its own")
    return token


# What gRPC's connection failures mean for this client, and the flag that fixes each (first match wins)
CONNECTION_HINTS: tuple[tuple[str, str], ...] = (
    (
        "WRONG_VERSION_NUMBER",
        "the owner does not serve TLS on this port: drop --ca/--cert/--key (plain text is "
        "allowed to a loopback owner; elsewhere ask its operator to enable TLS, or pass --insecure)",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the owner's certificate is not signed by a CA this client trusts: pass --ca "
        "with the CA that signed it (`offsite-owner certs init` writes ca.pem)",
    ),
    (
        "Socket closed",
        "the owner closed the connection during the handshake: it serves TLS, so pass --ca; under "
        "mutual TLS also --cert and --key (your client certificate)",
    ),
    ("Connection refused", "nothing listens at that address: is `offsite-owner serve` running there, on that port?"),
    ("DNS resolution failed", "the server's host name does not resolve: check --server"),
)


def connection_hint(code: grpc.StatusCode, details: str) -> str | None:
    """The fix for a failure to reach the owner, or None when the call reached it (its own message says why)."""
    # a stream the owner drops mid-call is also UNAVAILABLE, but never "failed to connect"
    if code != grpc.StatusCode.UNAVAILABLE or not ("failed to connect" in details or "DNS resolution" in details):
        return None
    return next((hint for marker, hint in CONNECTION_HINTS if marker in details), None)


class RemoteError(RuntimeError):
    """The owner refused or failed a call; the message carries its status and explanation, and for a connection
    that failed, what to change."""

    def __init__(self, error: grpc.RpcError):
        self.code = error.code()
        details = error.details() or ""
        self.hint = connection_hint(self.code, details)
        super().__init__(f"{self.code.name}: {details}" + (f"\nhint: {self.hint}" if self.hint else ""))


@dataclass(frozen=True)
class ClientTls:
    ca: Path | None = None  # None: the system's trusted roots
    cert: Path | None = None  # with key: a client certificate, for an owner that requires mTLS
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both --cert and --key")
        try:
            root = self.ca.read_bytes() if self.ca else None
            key = self.key.read_bytes() if self.key else None
            chain = self.cert.read_bytes() if self.cert else None
        except OSError as error:
            raise ValueError(f"cannot read a TLS file: {error}") from None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


class Remote:
    def __init__(
        self,
        server: str,
        token: str | None = None,
        timeout: float | None = None,
        tls: ClientTls | None = None,
        insecure: bool = False,
    ):
        """`timeout` overrides the deadline of every call; by default unary calls get UNARY_DEADLINE_SECONDS and
        streams STREAM_DEADLINE_SECONDS, so no call can hang forever.

        Without `tls`, a non-loopback owner is reached over TLS with the system's trusted roots, so the token never
        crosses a network in clear; `insecure` opts out.
        """
        token = token or os.environ.get(TOKEN_ENVIRONMENT)
        if not token and not (tls and tls.cert):
            raise ValueError(
                f"no tenant token: set {TOKEN_ENVIRONMENT}, pass --token-file or --token, or give the server a "
                "token_file (offsite servers add NAME ADDRESS --token-file FILE); or present --cert/--key"
            )
        if insecure and tls is not None:
            raise ValueError("--insecure turns TLS off; it cannot go with --ca, --cert or --key")
        if tls is None and not insecure and not is_loopback(server):
            tls = ClientTls()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = (
            grpc.secure_channel(server, tls.credentials(), options=options)
            if tls
            else grpc.insecure_channel(server, options=options)
        )
        self.stub = pb_grpc.ModelOwnerStub(self.channel)
        self.metadata = ((TOKEN_METADATA_KEY, TOKEN_SCHEME + token),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., Response], request: object) -> Response:
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout or UNARY_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            raise RemoteError(error) from None

    def _stream(self, method: Callable[..., Iterator[Response]], request: object) -> Iterator[Response]:
        try:
            yield from method(request, metadata=self.metadata, timeout=self.timeout or STREAM_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            raise RemoteError(error) from None

    def model_card(self) -> pb.ModelCard:
        return self._unary(self.stub.GetModelCard, pb.GetModelCardRequest())

    def pull(self, artifact: str, name: str, offset: int) -> Iterator[pb.ArtifactChunk]:
        """Raw chunks; the caller handles grpc.RpcError itself, to resume transient failures."""
        request = pb.PullArtifactRequest(artifact=artifact, file=name, offset=offset)
        return self.stub.PullArtifact(request, metadata=self.metadata, timeout=self.timeout or STREAM_DEADLINE_SECONDS)

    def push(self, messages: Iterator[pb.PushAdapterRequest]) -> pb.PushAdapterResponse:
        try:
            return self.stub.PushAdapter(
                messages, metadata=self.metadata, timeout=self.timeout or STREAM_DEADLINE_SECONDS
            )
        except grpc.RpcError as error:
            raise RemoteError(error) from None

    def evaluate(self, request: pb.EvaluateRequest) -> Iterator[pb.EvaluateEvent]:
        return self._stream(self.stub.Evaluate, request)

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateEvent]:
        return self._stream(self.stub.Generate, request)

    def represent(self, requests: Iterator[pb.RepresentRequest]) -> Iterator[pb.RepresentResponse]:
        return self._stream(self.stub.Represent, requests)

    def list_adapters(self) -> pb.ListAdaptersResponse:
        return self._unary(self.stub.ListAdapters, pb.ListAdaptersRequest())

    def delete_adapter(self, adapter_id: str) -> pb.DeleteAdapterResponse:
        return self._unary(self.stub.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id))
