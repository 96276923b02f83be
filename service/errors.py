"""Engine exceptions -> gRPC status codes: the one place where that mapping lives.

`map_errors` wraps each servicer method (unary or streaming), so the methods hold no
try/except. Invalid parameters carry a google.rpc.BadRequest detail naming the
request field, so clients can point at it without parsing the message.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidParameterError,
    QueueFullError,
    RequestFailedError,
)
from service.convert import api_field_path

logger = logging.getLogger(__name__)


class ServiceUnavailableError(RuntimeError):
    """The server cannot take requests now: the model is loading, or the server drains."""


class DuplicateRequestError(ValueError):
    """A call names a request_id that a running call already uses."""


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, list[any_pb2.Any]]:
    """(code, message, details) for an exception raised while serving a request."""
    if isinstance(exc, InvalidParameterError):
        # The prompt not fitting the context is a range error; any other bad value is invalid.
        code = grpc.StatusCode.OUT_OF_RANGE if isinstance(exc, ContextLengthError) else grpc.StatusCode.INVALID_ARGUMENT
        field = api_field_path(exc.field)
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=exc.description)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return code, f"{field}: {exc.description}", [detail]
    if isinstance(exc, DuplicateRequestError):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc), []
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy, retry later: {exc}", []
    if isinstance(exc, (EngineDeadError, ServiceUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc), []
    if isinstance(exc, RequestFailedError):
        return grpc.StatusCode.INTERNAL, f"generation failed: {exc}", []
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", []


async def _abort(servicer, request, context, exc: Exception) -> None:
    code, message, details = status_for(exc)
    request_id = getattr(request, "request_id", "") or "-"
    if code is grpc.StatusCode.INTERNAL:
        logger.error("[%s] %s", request_id, message, exc_info=exc)
    else:
        logger.info("[%s] %s: %s", request_id, code.name, message)
    servicer.metrics.count_error(code.name)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    await context.abort_with_status(rpc_status.to_status(status))


def map_errors(method):
    """Wrap a servicer method so that any exception ends the RPC with its mapped status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, logged, and sent as a status
                await _abort(self, request, context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, logged, and sent as a status
            await _abort(self, request, context, exc)

    return unary
