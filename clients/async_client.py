"""AsyncTextGenerationClient: the asyncio twin of TextGenerationClient (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from clients import convert
from clients.channel import ChannelSecurity, default_target
from clients.errors import from_rpc_error
from clients.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from clients.textgen.v1 import model_info_pb2, text_generation_service_pb2_grpc


class AsyncTextGenerationClient:
    """async with AsyncTextGenerationClient(target) as client: await client.generate("Hi").

    Create it inside the event loop that uses it (grpc.aio channels belong to one loop).
    TLS and token keywords as TextGenerationClient's.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = None,
        tls: bool | None = None,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        token: str | None = None,
    ):
        self.target = target or default_target()
        self.timeout = timeout
        security = ChannelSecurity.from_options(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
        self._metadata = security.metadata()
        self._channel = security.aio_channel(self.target)
        self._stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(self._channel)

    async def generate(self, prompt, *, timeout: float | None = None, **options) -> GenerationResult:
        """`prompt`: a text, token ids, or chat messages ([{"role": "user", "content": ...}])."""
        request = convert.generate_request(prompt, **options)
        try:
            response = await self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return convert.generation_result(response)

    async def generate_batch(self, prompts, *, timeout: float | None = None, **options) -> list[GenerationResult]:
        """One request per prompt, all in flight at once so that the server batches them."""
        return list(await asyncio.gather(*(self.generate(p, timeout=timeout, **options) for p in prompts)))

    async def generate_stream(self, prompt, *, timeout: float | None = None, **options) -> AsyncIterator[StreamChunk]:
        """Chunks as the server makes them; leaving the loop early cancels the request."""
        call = self._stub.GenerateStream(
            convert.generate_request(prompt, **options), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield convert.stream_chunk(response)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()

    async def tokenize(self, text: str, *, return_offsets: bool = False) -> TokenizeResult:
        try:
            response = await self._stub.Tokenize(
                convert.tokenize_request(text, return_offsets), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return convert.tokenize_result(response)

    async def model_info(self) -> ModelInfo:
        try:
            response = await self._stub.GetModelInfo(
                model_info_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return convert.model_info(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTextGenerationClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
