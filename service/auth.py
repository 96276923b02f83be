"""Optional bearer-token check: a grpc.aio server interceptor.

Tokens come from a file (--auth-token-file, one per line, `#` comments) and/or the
TEXTGEN_AUTH_TOKENS environment variable (comma-separated), never from the command
line, where any user of the machine could read them (ps, /proc). With no token
configured, no check is made. A call must carry `authorization: Bearer <token>`
metadata; anything else ends with UNAUTHENTICATED before the servicer runs. Health
checks stay open unless --auth-health is given, so probes need no secret.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

TOKENS_ENV = "TEXTGEN_AUTH_TOKENS"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class AuthConfigError(ValueError):
    """A token source is given but unusable (unreadable, empty): the server must not start open."""


def load_tokens(token_file: str | os.PathLike | None, environ=os.environ) -> tuple[bytes, ...]:
    """Every token from the file and the environment; () when neither is given."""
    tokens: list[str] = []
    if token_file is not None:
        try:
            text = Path(token_file).read_text()
        except OSError as error:
            raise AuthConfigError(f"--auth-token-file: cannot read {token_file}: {error.strerror}") from None
        found = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise AuthConfigError(f"--auth-token-file: {token_file} holds no token")
        tokens += found
    if environ.get(TOKENS_ENV, "").strip():
        tokens += [t.strip() for t in environ[TOKENS_ENV].split(",") if t.strip()]
    for token in tokens:
        if any(c.isspace() for c in token) or not token.isprintable():
            raise AuthConfigError("auth tokens must be printable and hold no whitespace")
    return tuple(dict.fromkeys(t.encode() for t in tokens))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a known bearer token (health exempt unless told otherwise)."""

    def __init__(self, tokens: tuple[bytes, ...], *, protect_health: bool = False, on_denied=None):
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = tokens
        self._protect_health = protect_health
        self._on_denied = on_denied  # called with no argument per refused call (metrics)

    def _authorized(self, metadata) -> bool:
        values = [value for key, value in metadata or () if key == "authorization"]
        if len(values) != 1:
            return False
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every token in constant time, so timing tells nothing of a near miss.
        matches = [hmac.compare_digest(token, known) for known in self._tokens]
        return any(matches)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._protect_health and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: let gRPC answer UNIMPLEMENTED
            return None
        logger.info("refused %s: missing or unknown bearer token", method)
        if self._on_denied is not None:
            self._on_denied()
        return _denying_handler(handler)


async def _deny(request_or_iterator, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required (authorization metadata)")


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming) as `handler` that only refuses."""
    serializers = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **serializers)
    return grpc.unary_unary_rpc_method_handler(_deny, **serializers)
