"""TextGenerationService: convert, call the AsyncEngine, convert back.

Error handling lives in service/errors.py (the map_errors decorator) and protobuf
conversion in service/convert.py, so each method only wires them together.
"""

from __future__ import annotations

import asyncio

from clients.textgen.v1 import text_generation_service_pb2_grpc as pb_grpc
from service import convert
from service.errors import ServiceUnavailableError, map_errors
from service.request_run import RequestRun


class TextGenerationServicer(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, metrics):
        self.metrics = metrics
        # Set by the server once the model is loaded and warmed; None until then.
        self.engine = None
        # Cleared by the server when it starts draining: calls already running go on.
        self.accepting = True
        # Generate / GenerateStream calls whose engine request runs, by request id.
        self.in_flight: dict[str, RequestRun] = {}

    def _engine(self):
        if not self.accepting:
            raise ServiceUnavailableError("the server is shutting down; retry on another replica")
        if self.engine is None:
            raise ServiceUnavailableError("the model is still loading; retry when health says SERVING")
        return self.engine

    def _generating_engine(self):
        engine = self._engine()
        # A stuck step loop (the watchdog) would leave a new request waiting until its deadline.
        if not engine.is_healthy:
            raise ServiceUnavailableError("the engine is not healthy (its step loop is stuck or stopped); retry later")
        return engine

    async def _start(self, request, context) -> RequestRun:
        engine = self._generating_engine()
        ids = None
        if convert.long_input(request):  # the tokenizer runs without the GIL: the loop goes on
            ids = await asyncio.to_thread(convert.prompt_token_ids, request, engine.tokenizer)
        return RequestRun(engine, self.metrics, request, context, self.in_flight, prompt_token_ids=ids)

    @map_errors
    async def Generate(self, request, context):
        run = await self._start(request, context)
        outputs = [output async for output in run]
        return convert.generate_response_to_pb(run.request, outputs, request.return_prompt_token_ids)

    @map_errors
    async def GenerateStream(self, request, context):
        run = await self._start(request, context)
        started: set[int] = set()
        async for output in run:
            for delta in output.sequences:
                first = delta.index not in started
                started.add(delta.index)
                yield convert.stream_response_to_pb(run.request, output, delta, first, request.return_prompt_token_ids)

    @map_errors
    async def Tokenize(self, request, context):
        tokenizer = self._engine().tokenizer
        if request.return_offsets:
            encode = lambda: tokenizer.encode_with_offsets(request.text)  # noqa: E731
        else:
            encode = lambda: (tokenizer.encode(request.text), None)  # noqa: E731
        if len(request.text) > convert.OFF_LOOP_CHARS:
            return convert.tokenize_response_to_pb(*await asyncio.to_thread(encode))
        return convert.tokenize_response_to_pb(*encode())

    @map_errors
    async def GetModelInfo(self, request, context):
        return convert.model_info_to_pb(self._engine().info)
