"""Channels shared by the sync and asyncio clients: limits, TLS, bearer token."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

# Mirror the server's limits (service/server.py): requests up to 4 MiB, and unary
# responses up to 16 MiB (many sequences with logprobs), above gRPC's 4 MiB default.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)
DEFAULT_TARGET = "127.0.0.1:50051"
# The bearer token a client sends when none is passed (the server's list is TEXTGEN_AUTH_TOKENS).
TOKEN_ENV = "TEXTGEN_AUTH_TOKEN"


def default_target() -> str:
    """$TEXTGEN_TARGET if set (so scripts need no edit to reach another server), else DEFAULT_TARGET."""
    return os.environ.get("TEXTGEN_TARGET") or DEFAULT_TARGET


def _pem(value) -> bytes | None:
    """PEM bytes as given, or read from a path (str or os.PathLike)."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches the server: plaintext or TLS, an optional client certificate
    (mutual TLS), and an optional bearer token sent as `authorization` metadata."""

    tls: bool = False
    root_certificates: bytes | None = None  # CAs that sign the server's certificate; None: the system's
    certificate_chain: bytes | None = None  # the client's own, for mutual TLS
    private_key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_options(cls, *, tls=None, tls_ca=None, tls_cert=None, tls_key=None, token=None) -> ChannelSecurity:
        """tls_ca / tls_cert / tls_key: PEM bytes or file paths; any of them implies TLS.
        token None: $TEXTGEN_AUTH_TOKEN, if set."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the client certificate and its key)")
        if tls is None:
            tls = any(v is not None for v in (tls_ca, tls_cert, tls_key))
        elif not tls and any(v is not None for v in (tls_ca, tls_cert, tls_key)):
            raise ValueError("tls=False with TLS certificates given")
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        return cls(bool(tls), _pem(tls_ca), _pem(tls_cert), _pem(tls_key), token)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel(self, target: str) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(target, self._credentials(), options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(target, self._credentials(), options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
