"""TextGenerationClient: blocking calls with plain arguments and dataclass results."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from clients import convert
from clients.channel import ChannelSecurity, default_target
from clients.errors import from_rpc_error
from clients.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from clients.textgen.v1 import model_info_pb2, text_generation_service_pb2_grpc


class TextGenerationClient:
    """client = TextGenerationClient("127.0.0.1:50051"); client.generate("Hi", max_new_tokens=8).

    Generation keywords are GenerationConfig's (transformers') names: max_new_tokens,
    do_sample, temperature, top_k, top_p, seed, stop_sequences, num_return_sequences, ...
    Failed calls raise clients.TextGenerationError.

    Security: tls_ca (the CAs of the server's certificate; PEM bytes or a path) turns TLS
    on (tls=True alone uses the system's CAs); tls_cert + tls_key add a client certificate
    for mutual TLS; token is sent as a bearer token (default: $TEXTGEN_AUTH_TOKEN).
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
        self._channel = security.channel(self.target)
        self._stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(self._channel)

    def generate(self, prompt, *, timeout: float | None = None, **options) -> GenerationResult:
        """`prompt`: a text, token ids, or chat messages ([{"role": "user", "content": ...}])."""
        return self.generate_batch([prompt], timeout=timeout, **options)[0]

    def generate_batch(self, prompts, *, timeout: float | None = None, **options) -> list[GenerationResult]:
        """One request per prompt, all sent at once so that the server batches them."""
        calls = [
            self._stub.Generate.future(
                convert.generate_request(p, **options), timeout=timeout or self.timeout, metadata=self._metadata
            )
            for p in prompts
        ]
        try:
            return [convert.generation_result(call.result()) for call in calls]
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            for call in calls:
                call.cancel()  # a no-op for finished calls; stops the others after a failure

    def generate_stream(self, prompt, *, timeout: float | None = None, **options) -> Iterator[StreamChunk]:
        """Chunks as the server makes them; leaving the loop early cancels the request."""
        call = self._stub.GenerateStream(
            convert.generate_request(prompt, **options), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            for response in call:
                yield convert.stream_chunk(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()

    def tokenize(self, text: str, *, return_offsets: bool = False) -> TokenizeResult:
        try:
            response = self._stub.Tokenize(
                convert.tokenize_request(text, return_offsets), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return convert.tokenize_result(response)

    def model_info(self) -> ModelInfo:
        try:
            response = self._stub.GetModelInfo(
                model_info_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return convert.model_info(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TextGenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
