"""Start-up, serving and draining of the gRPC server (`python -m service`).

Order of events: the port opens at once with health NOT_SERVING (so probes get an
answer while the model loads), the model loads in a worker thread, one tiny
generation warms it, then health turns SERVING. SIGTERM (or SIGINT) turns health
NOT_SERVING, answers new calls UNAVAILABLE, lets in-flight ones finish for up to
--drain-grace-s, cancels the rest, and stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from clients.textgen.v1 import text_generation_service_pb2, text_generation_service_pb2_grpc
from engine.async_engine import AsyncEngine
from engine.llm_engine import freeze_startup_objects
from engine.params import GenerationRequest
from service.auth import AuthConfigError, BearerTokenInterceptor, load_tokens
from service.metrics import ServiceMetrics
from service.options import engine_options, parse_args
from service.servicer import TextGenerationServicer

logger = logging.getLogger("service")

SERVICE_NAME = text_generation_service_pb2.DESCRIPTOR.services_by_name["TextGenerationService"].full_name

# Message size limits, set on purpose rather than left to defaults:
# - in, 4 MiB (gRPC's default): a prompt of 128k tokens is at most 640 KiB as token ids,
#   so 4 MiB holds any prompt a served context can take while capping what one call
#   can make the server buffer and parse.
# - out, 16 MiB: a unary response can be far larger than its request: several
#   sequences x thousands of tokens x up to 20 logprob alternatives each (e.g. 8 x 4096
#   x 21 x ~12 B = 8 MiB). Streaming messages stay small whatever the request.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    # A second server on a taken port must fail, not share it silently.
    ("grpc.so_reuseport", 0),
)
HEALTH_POLL_S = 1.0
SWITCH_INTERVAL_S = 0.0005
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TextGenServer:
    """One gRPC server around one AsyncEngine. `engine` may be given (tests) instead of loaded."""

    def __init__(self, options, engine: AsyncEngine | None = None):
        self.options = options
        self.engine = engine
        self._owns_engine = engine is None
        self.metrics = ServiceMetrics(model=options.model)
        self.servicer = TextGenerationServicer(self.metrics)
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None  # made in start(): it binds to the running loop
        self._health_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Open the port (TLS and token checks as configured), health NOT_SERVING.

        Raises AuthConfigError, or OSError for an unreadable TLS file, before any port opens."""
        # The step loop's thread and this event loop share the GIL. With Python's default
        # 5 ms switch interval a thread that wants the GIL can wait a whole decode step
        # for it; 0.5 ms lets the event loop stream each step's tokens while the step
        # loop prepares the next one (the server process does little else).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        credentials = server_credentials(self.options)
        tokens = load_tokens(self.options.auth_token_file)
        interceptors = []
        if tokens:
            interceptors.append(
                BearerTokenInterceptor(
                    tokens,
                    protect_health=self.options.auth_health,
                    on_denied=lambda: self.metrics.count_error("UNAUTHENTICATED"),
                )
            )
        self._server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        await self._set_health(NOT_SERVING)
        text_generation_service_pb2_grpc.add_TextGenerationServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{self.options.host}:{self.options.port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        if self.options.metrics_port is not None:
            self.metrics.serve(self.options.host, self.options.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.options.host, self.options.metrics_port)
        security = "mutual TLS" if self.options.tls_client_ca else "TLS" if credentials else "plaintext"
        logger.info(
            "listening on %s:%d (%s, %s; NOT_SERVING until the model is loaded)",
            self.options.host, self.port, security,
            f"{len(tokens)} bearer token(s)" if tokens else "no token check",
        )  # fmt: skip
        return self.port

    async def load(self) -> None:
        """Load (unless given) and warm the model, then turn health SERVING."""
        if self.engine is None:
            logger.info("loading model %s ...", self.options.model)
            began = time.monotonic()
            chosen = engine_options(self.options)
            # A server captures its CUDA graphs before SERVING, not during the first
            # requests; and it steps the engine in a process of its own, so that its event
            # loop does not share a GIL with the step loop (docs/benchmarks.md: streamed
            # throughput 0.82-0.95 of in-process with a thread, 1.00 with the process).
            # Tensor-parallel engines start rank processes instead. Flags override both.
            defaults = {"capture_graphs_at_start": True,
                        "engine_process": chosen.get("tensor_parallel_size", 1) == 1}
            self.engine = await asyncio.to_thread(
                AsyncEngine.from_pretrained,
                self.options.model,
                use_fp8=self.options.use_fp8,
                dtype=self.options.dtype,
                device=self.options.device,
                **{**defaults, **chosen},
            )
            logger.info("model loaded in %.1f s", time.monotonic() - began)
        info = self.engine.info
        logger.info(
            "model %s: %s, %s, fp8=%s, context %d, vocab %d",
            info.model_id, info.architecture, info.dtype, info.fp8, info.max_model_len, info.vocab_size,
        )  # fmt: skip
        await self._warm_up()
        self.metrics.model = info.model_id
        self.metrics.watch_engine(self.engine)
        self.servicer.engine = self.engine
        await self._set_health(SERVING)
        self._health_task = asyncio.create_task(self._follow_engine_health())
        logger.info("SERVING on %s:%d", self.options.host, self.port)

    async def _warm_up(self) -> None:
        # One tiny generation runs every code path once (first kernels, allocations),
        # so the first client does not pay for it and SERVING means "can generate".
        began = time.monotonic()
        prompt = self.engine.tokenizer.encode("Hello")
        params = self.engine.resolve_params(len(prompt), max_new_tokens=2)
        async for _ in self.engine.generate(GenerationRequest(prompt, params, request_id="warm-up")):
            pass
        logger.info("warm-up generation took %.2f s", time.monotonic() - began)

    async def _follow_engine_health(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            if self.engine.is_healthy != healthy:
                healthy = not healthy
                logger.warning("engine health changed: %s", "healthy" if healthy else "NOT healthy")
                await self._set_health(SERVING if healthy else NOT_SERVING)

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, stop the engine.

        The port stays open while calls drain, so new calls get a clean UNAVAILABLE from the
        servicer and health checks see NOT_SERVING, rather than a connection going away.
        """
        grace = self.options.drain_grace_s
        deadline = time.monotonic() + grace
        calls = self.servicer.in_flight
        self.servicer.accepting = False
        await self.health.enter_graceful_shutdown()
        logger.info("draining: NOT_SERVING, %d calls in flight get up to %.1f s", len(calls), grace)
        if self._health_task is not None:
            self._health_task.cancel()
        while calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if calls:
            logger.warning("drain grace over: cancelling %d calls (%s)", len(calls), ", ".join(sorted(calls)))
        # Cancels what is left; a short grace lets finished calls flush their last messages.
        await self._server.stop(max(0.0, deadline - time.monotonic()) or 0.1)
        self.metrics.stop_serving()
        if self._owns_engine and self.engine is not None:
            await self.engine.shutdown()
        logger.info("stopped")


def server_credentials(options) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (+ --tls-client-ca: client certificates required)."""
    if not options.tls_cert and not options.tls_key:
        if options.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (options.tls_cert and options.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    key, chain = Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes()
    client_ca = Path(options.tls_client_ca).read_bytes() if options.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def serve(options) -> int:
    server = TextGenServer(options)
    try:
        await server.start()
    except (AuthConfigError, OSError, ValueError) as error:
        logger.error("cannot start: %s", error)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = loading.done() and loading.exception() is not None
    if failed:
        logger.error("could not load the model", exc_info=loading.exception())
    else:
        if loading.done():  # loaded and serving: this process serves until it exits
            freeze_startup_objects()
        await stopping
    loading.cancel()
    await server.drain()
    return 1 if failed else 0


def main(argv=None) -> None:
    options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise SystemExit(asyncio.run(serve(options)))
