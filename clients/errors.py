"""The one exception the clients raise for a failed call."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class TextGenerationError(Exception):
    """A call ended with a non-OK gRPC status.

    `code` is the grpc.StatusCode; `field_violations` lists (field, description) pairs
    from the server's google.rpc.BadRequest detail (e.g. ("config.temperature", ...)).
    """

    def __init__(self, code: grpc.StatusCode, message: str, field_violations: list[tuple[str, str]]):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations


def from_rpc_error(error: grpc.RpcError) -> TextGenerationError:
    """Read code, message and BadRequest details off a failed call (sync or asyncio)."""
    violations = []
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return TextGenerationError(error.code(), error.details() or "", violations)
