"""service/errors.py: every engine exception has its gRPC status (the one mapping table)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidParameterError,
    QueueFullError,
    RequestFailedError,
)
from service.errors import DuplicateRequestError, ServiceUnavailableError, status_for

CASES = [
    (InvalidParameterError("temperature", "must be > 0"), grpc.StatusCode.INVALID_ARGUMENT, "config.temperature"),
    (InvalidParameterError("stop_strings", "empty"), grpc.StatusCode.INVALID_ARGUMENT, "config.stop_sequences"),
    (InvalidParameterError("token_ids", "out of vocab"), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids"),
    (ContextLengthError("input_ids", "too long"), grpc.StatusCode.OUT_OF_RANGE, "input"),
    (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    (EngineDeadError("dead"), grpc.StatusCode.UNAVAILABLE, None),
    (ServiceUnavailableError("loading"), grpc.StatusCode.UNAVAILABLE, None),
    (DuplicateRequestError("in use"), grpc.StatusCode.ALREADY_EXISTS, None),
    (RequestFailedError("step failed"), grpc.StatusCode.INTERNAL, None),
    (KeyError("surprise"), grpc.StatusCode.INTERNAL, None),
]


@pytest.mark.parametrize("exc, code, field", CASES, ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)])
def test_status_for(exc, code, field):
    got_code, message, details = status_for(exc)
    assert got_code == code
    if field is None:
        assert details == []
        assert str(exc).strip("'") in message
    else:
        bad_request = error_details_pb2.BadRequest()
        [detail] = details
        assert detail.Unpack(bad_request)
        assert [(v.field, v.description) for v in bad_request.field_violations] == [(field, exc.description)]
        assert message == f"{field}: {exc.description}"


def test_unexpected_errors_name_their_type():
    _, message, _ = status_for(KeyError("surprise"))
    assert message == "internal error: KeyError: 'surprise'"
