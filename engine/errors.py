"""Engine exceptions. The service maps each to one gRPC status, in one place."""

from __future__ import annotations


class InvalidParameterError(ValueError):
    """A request or generation parameter is invalid. `field` names it (transformers' name)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ContextLengthError(InvalidParameterError):
    """The prompt does not fit the model's context."""


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests; try again later."""


class EngineDeadError(RuntimeError):
    """The step loop has stopped (a fatal error or a stuck step); no request can be served."""


class ModelLoadError(RuntimeError):
    """A model could not be found, read, or is of an unsupported architecture."""


class RequestFailedError(RuntimeError):
    """The engine could not finish this request (its model step failed); others go on."""


def output_error(message: str, engine_stopped: bool) -> RuntimeError:
    """What a request's error output raises for its caller: EngineDeadError when the
    engine stopped or stalled under it (a retry elsewhere may succeed; gRPC UNAVAILABLE),
    else RequestFailedError (its own step failed; INTERNAL)."""
    return EngineDeadError(message) if engine_stopped else RequestFailedError(message)
