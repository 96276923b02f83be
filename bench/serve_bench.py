"""Serving benchmark: the gRPC service against the same engine called in process, on one GPU.

One process builds the model (by default the Llama-2-7B shape with random bf16 weights on
CUDA, our CudaRuntime, the KV pool sized from free memory, as bench/gpu_bench.py builds it),
wraps it in an AsyncEngine (the EngineLoop thread owns the LLMEngine), and serves it with the
real TextGenServer on a free localhost port. Then, for each request rate:

  1. gRPC: N requests through the streaming RPC (GenerateStream) with our
     AsyncTextGenerationClient;
  2. in process: the same arrival schedule against AsyncEngine.generate() directly, on the
     event loop that hosts the server (idle then), consuming its outputs the same way.

Load. Arrivals are a Poisson process: inter-arrival gaps are drawn from an exponential
distribution of mean 1/rate (random.Random seeded per rate, so both paths replay the same
offsets); the first request goes at offset 0, and rate "inf" sends all N at offset 0. Each
request has --prompt-len random token ids (sent as token ids, no tokenizer involved) and
generates exactly --new-tokens tokens (greedy, min_new_tokens = max_new_tokens). Every prompt
differs from every other, across both paths too: identical ids would be served from the
prefix cache that the gRPC pass filled, so the in-process pass gets fresh random prompts of
the same length (its cost does not depend on the ids: random weights, fixed lengths). The
prefix cache stays on; the cached token counts are reported and should be 0.

Where the client runs. By default in a separate process (--client process): grpc.aio and the
protobuf parsing of every streamed message hold the GIL, and in the server's process they
would steal it from the step-loop thread and the server's event loop, charging the client's
cost to the server, which a real client on another host does not do. The server, the engine
and the in-process consumer share the bench's main process, as in `python -m service`.
--client thread runs the client on its own event loop in a thread of the bench process, to
see what that competition costs.

Where the step loop runs. By default on an EngineLoop thread of the bench's main process, so
the server's event loop and the step loop share one GIL. --engine-process builds the same
LLMEngine in a child process and steps it there (engine/engine_process.py, as
`python -m service --engine-process` does); both paths then read the child's outputs.

Per request, all times from time.perf_counter() in the process that consumes the stream:
  send    just before the call is issued (gRPC) or the request submitted (in process);
          the lag behind its scheduled offset is reported (max send lag) to check that the
          load generator keeps up;
  TTFT    from send to the arrival of the first message carrying a token;
  ITL     the gaps between successive token arrivals; a message that carries k > 1 tokens
          counts its gap once and then k - 1 zero gaps (the tokens arrive together), so each
          request contributes exactly new_tokens - 1 gaps; percentiles pool all requests' gaps;
  end     arrival of the request's last message (the one with its finish reason);
  E2E     end - send.
Per rate: sent req/s = (N - 1) / (last send - first send) (the achieved arrival rate);
done req/s = N / (last end - first send); output tok/s = total generated tokens /
(last end - first send); percentiles interpolate linearly between closest ranks. At rates
well below the engine's capacity the output throughput follows the arrival rate, so the
gRPC / in-process throughput ratio (target >= 0.95) is most telling at the high rates.

Warm-up, not measured: on CUDA an offline batch of max_num_seqs prompts runs before the step
loop starts and every decode CUDA graph is captured; then the server's own warm-up
generation, and one pass per path of --warmup-requests full-length requests at the highest
finite rate (Triton compiles some kernels per split count, i.e. per context length range).

Output: the table to stdout; every figure, per-request summaries, the engine config and the
environment to DIR/serve_bench.json; engine and service logs (INFO: the service logs each
request's start and end, as `python -m service` does by default) to DIR/serve_bench.log.

Usage: python bench/serve_bench.py [--tiny] [--rates 2,8,32,inf] [--requests 200] [--prompt-len 128]
       [--new-tokens 128] [--max-num-seqs 64] [--warmup-requests N] [--engine-option NAME=VALUE ...]
       [--client process|thread] [--engine-process] [--out DIR (default $OUT, else .)]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import gc
import json
import logging
import math
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import AsyncIterator, Callable

# Repository root (engine, service, clients) and bench/ (gpu_bench). Both are inherited by
# the spawned client process, which imports this module without torch.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

TARGET_RATIO = 0.95
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, rope_theta=10000.0)

# A stream, as both paths present it: per message (tokens in it, finish reason or None,
# cached prompt tokens on the last message or None).
Delta = tuple[int, "str | None", "int | None"]
OpenStream = Callable[[int, list[int]], AsyncIterator[Delta]]


# ---- load: schedule and prompts ------------------------------------------------------------


def parse_rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else float(text)


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals: seconds after the pass starts, the first at 0."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random ids in [3, vocab): 0-2 are the usual special tokens."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


# ---- driving a pass (runs in whichever process consumes the streams) -----------------------


async def timed_request(stream: AsyncIterator[Delta], scheduled: float) -> dict:
    """Consume one stream, timing its messages (see the module docstring)."""
    send = time.perf_counter()
    first = last = end = None
    gaps: list[float] = []
    tokens, finish, cached, error = 0, None, None, None
    try:
        async for count, reason, cached_tokens in stream:
            now = time.perf_counter()
            if count:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                gaps.extend([0.0] * (count - 1))  # the message's other tokens came at the same time
                last, tokens = now, tokens + count
            if reason is not None:
                finish, cached, end = reason, cached_tokens, now
    except Exception as exc:  # noqa: BLE001 - one failed request is reported, not fatal
        error = f"{type(exc).__name__}: {exc}"
    return dict(scheduled=scheduled, send=send, first=first, end=end if end is not None else time.perf_counter(),
                tokens=tokens, gaps=gaps, finish=finish, cached=cached, error=error)


async def drive(offsets: list[float], prompts: list[list[int]], open_stream: OpenStream) -> list[dict]:
    """Start request i at offsets[i] after the pass starts; wait for all of them."""
    start = time.perf_counter()
    tasks = []
    for i, (offset, prompt) in enumerate(zip(offsets, prompts)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed_request(open_stream(i, prompt), start + offset)))
    return list(await asyncio.gather(*tasks))


def client_pass(target: str, offsets: list[float], prompts: list[list[int]], new_tokens: int, tag: str) -> list[dict]:
    """One gRPC pass on a fresh event loop (in the client process or thread). The objects
    alive before it leave the garbage collector's full collections, whose pauses (19 to 58
    ms measured in the client process) would count as the server's inter-token latency."""
    gc.collect()
    gc.freeze()
    return asyncio.run(_client_pass(target, offsets, prompts, new_tokens, tag))


async def _client_pass(target, offsets, prompts, new_tokens, tag) -> list[dict]:
    from clients.async_client import AsyncTextGenerationClient

    async def grpc_stream(client, i: int, prompt: list[int]) -> AsyncIterator[Delta]:
        chunks = client.generate_stream(prompt, request_id=f"{tag}-{i}", max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False)
        async for chunk in chunks:
            yield len(chunk.token_ids), chunk.finish_reason, chunk.usage.cached_tokens if chunk.usage else None

    async with AsyncTextGenerationClient(target) as client:
        await client.model_info()  # the connection is up before the clock starts
        return await drive(offsets, prompts, lambda i, p: grpc_stream(client, i, p))


async def engine_pass(engine, offsets, prompts, new_tokens: int, tag: str) -> list[dict]:
    """The same pass against the AsyncEngine, on the running (server's) event loop."""
    from engine.params import GenerationRequest

    async def engine_stream(i: int, prompt: list[int]) -> AsyncIterator[Delta]:
        # As the servicer does: resolve the same overrides, then one delta per sequence per step.
        params = engine.resolve_params(len(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)
        async for output in engine.generate(GenerationRequest(prompt, params, request_id=f"{tag}-{i}")):
            for delta in output.sequences:
                reason = delta.finish_reason.value if delta.finish_reason is not None else None
                yield len(delta.token_ids), reason, output.cached_tokens if reason else None

    return await drive(offsets, prompts, engine_stream)


# ---- figures -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(records: list[dict], new_tokens: int) -> dict:
    ok = [r for r in records if r["error"] is None]
    first_send = min(r["send"] for r in records)
    span = max(r["end"] for r in records) - first_send
    send_span = max(r["send"] for r in records) - first_send
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["first"] - r["send"] for r in ok if r["first"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    e2e = [r["end"] - r["send"] for r in ok]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wrong_length": sum(r["tokens"] != new_tokens for r in ok),
        "cached_prompt_tokens": sum(r["cached"] or 0 for r in ok),
        "duration_s": span,
        "sent_req_s": (len(records) - 1) / send_span if send_span > 0 else None,
        "done_req_s": len(records) / span,
        "output_tokens": tokens,
        "output_tok_s": tokens / span,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
        "max_send_lag_s": max(r["send"] - r["scheduled"] for r in records),
        "first_errors": [r["error"] for r in records if r["error"]][:3],
    }


def per_request(records: list[dict]) -> list[dict]:
    """Compact per-request figures for the JSON (offsets from the pass's first send)."""
    base = min(r["send"] for r in records)
    return [{"send_s": r["send"] - base, "ttft_s": None if r["first"] is None else r["first"] - r["send"],
             "e2e_s": r["end"] - r["send"], "tokens": r["tokens"], "finish": r["finish"], "error": r["error"]}
            for r in records]


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def table(rows: list[dict]) -> str:
    num = lambda v, f=".1f": "n/a" if v is None else format(v, f)  # noqa: E731
    lines = ["| rate req/s | path | sent req/s | done req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms | E2E p50 ms | errors | gRPC/in-process tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for path in ("grpc", "in_process"):
            s = row[path]
            ratio = num(row["throughput_ratio"], ".3f") if path == "grpc" else ""
            lines.append(f"| {row['rate']} | {path} | {num(s['sent_req_s'], '.2f')} | {num(s['done_req_s'], '.2f')} "
                         f"| {num(s['output_tok_s'])} | {ms(s['ttft_p50_s'])} | {ms(s['ttft_p99_s'])} "
                         f"| {ms(s['itl_p50_s'])} | {ms(s['itl_p99_s'])} | {ms(s['e2e_p50_s'])} "
                         f"| {s['errors'] + s['wrong_length']} | {ratio} |")
    return "\n".join(lines)


# ---- the model -----------------------------------------------------------------------------


class ServeTokenizer:
    """Just enough tokenizer for the service around a vocabulary-less random model: the
    engine's text layer decodes to "" (as gpu_bench's StubTokenizer), and encode, which only
    the server's warm-up ("Hello") uses here since prompts arrive as ids, maps bytes to ids."""

    byte_fallback_ids = frozenset()
    skippable_ids = frozenset()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [3 + b % (self.vocab_size - 3) for b in text.encode("utf-8")] or [3]

    def decode_raw(self, ids, skip_special_tokens=False) -> str:
        return ""

    def decode(self, ids, skip_special_tokens=False) -> str:
        return ""


def tiny_cpu_weights(shape: dict) -> dict:
    """HF-named random float32 weights on the CPU (gpu_bench.random_weights is CUDA-only)."""
    import torch

    g = torch.Generator().manual_seed(0)
    H, inter, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * H // shape["num_attention_heads"]
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    weights = {"model.embed_tokens.weight": rnd(V, H) * 50, "lm_head.weight": rnd(V, H),
               "model.norm.weight": torch.ones(H)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, size in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (kv, H)), ("self_attn.v_proj", (kv, H)),
                           ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (inter, H)), ("mlp.up_proj", (inter, H)),
                           ("mlp.down_proj", (H, inter))):
            weights[p + name + ".weight"] = rnd(*size)
        weights[p + "input_layernorm.weight"] = torch.ones(H)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(H)
    return weights


def build_llm_engine(args):
    """(LLMEngine, shape, runtime, kv blocks): gpu_bench's build on CUDA, TorchRuntime for --tiny."""
    import gpu_bench as gb
    import torch

    if args.tiny:
        from engine.config import EngineConfig
        from engine.runtime.torch_runtime import TorchRuntime

        shape = TINY_LLAMA
        runtime = TorchRuntime(gb.spec_for(shape), tiny_cpu_weights(shape), torch.float32, "cpu")
        config, max_model_len = EngineConfig(max_num_seqs=args.max_num_seqs), shape["max_position_embeddings"]
    else:
        shape = {"llama2-7b": gb.LLAMA2_7B, "llama3-8b": gb.LLAMA3_8B}[args.shape]
        weights = gb.random_weights(shape)
        # The runtime reads some options too (prefill_graph_tokens, use_cuda_graphs).
        runtime, config, max_model_len = gb.make_runtime(gb.spec_for(shape), weights, max_num_seqs=args.max_num_seqs,
                                                         **args.engine_option)
        del weights
        gb.free_memory()
    engine, blocks = gb.make_engine(runtime, config, max_model_len, **args.engine_option)
    if not args.tiny:
        # Kernels first, then every decode graph, on this thread before the step loop owns the engine.
        warm = random_prompts(args.max_num_seqs, args.prompt_len, shape["vocab_size"], seed=999)
        gb.run_offline(engine, warm, 8, max_model_len)
        runtime.warm_up()
    return engine, shape, runtime, blocks


def child_llm_engine(args):
    """--engine-process: the builder that runs in the engine's child process. Spawn pickles
    it by name (`__main__.child_llm_engine` when this file runs as a script) and the child
    re-imports this file as `__mp_main__` first, whose top level puts bench/ and the
    repository on sys.path, so the name resolves there and gpu_bench imports."""
    return build_llm_engine(args)[0]


def build_async_engine(args):
    """AsyncEngine around the bench's LLMEngine, as engine/factory.py assembles one: on an
    EngineLoop thread, or (--engine-process) built and stepped in a child process."""
    from engine.async_engine import AsyncEngine
    from engine.engine_loop import EngineLoop
    from engine.factory import LoadedModel
    from engine.generation_config import resolve_sampling_params
    from engine.model_info import ModelInfo

    if args.engine_process:
        from engine.engine_process import ProcessEngineLoop

        loop = ProcessEngineLoop(functools.partial(child_llm_engine, args))
        report = loop.report
        config, runtime_name, device, dtype = report.config, report.runtime, report.device, report.dtype
        blocks, max_model_len, kv_pool = loop.limits.num_kv_blocks, loop.limits.max_model_len, report.kv_pool
        shape = TINY_LLAMA if args.tiny else None  # the full shapes are gpu_bench's, below
    else:
        llm, shape, runtime, blocks = build_llm_engine(args)
        config, max_model_len = llm.config, llm.max_model_len
        loop = EngineLoop(llm, config.max_in_flight, config.watchdog_timeout_s)
        runtime_name, device, dtype = type(runtime).__name__, str(runtime.device), str(runtime.dtype).removeprefix("torch.")
        kv_pool = getattr(runtime, "kv_pool_report", None)
    if shape is None:
        import gpu_bench as gb

        shape = {"llama2-7b": gb.LLAMA2_7B, "llama3-8b": gb.LLAMA3_8B}[args.shape]
    defaults = resolve_sampling_params({}, None, prompt_len=1, max_model_len=max_model_len)
    info = ModelInfo(model_id="random-" + ("tiny-llama" if args.tiny else args.shape), architecture="llama",
                     dtype=dtype, fp8=False, max_model_len=max_model_len,
                     vocab_size=shape["vocab_size"], eos_token_ids=defaults.eos_token_ids, default_params=defaults)
    engine = AsyncEngine(LoadedModel(loop, info, ServeTokenizer(shape["vocab_size"]), HERE, {}))
    model = {"shape": shape, "runtime": runtime_name, "device": device, "dtype": dtype,
             "kv_blocks": blocks, "block_size": config.block_size, "max_num_seqs": config.max_num_seqs,
             "max_num_batched_tokens": config.max_num_batched_tokens, "max_model_len": max_model_len,
             "kv_pool": kv_pool, "engine_config": dataclasses.asdict(config),
             "step_loop": "child process" if args.engine_process else "thread"}
    return engine, model


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_name()}",
            "torch": torch.__version__, "python": platform.python_version(), "grpcio": version("grpcio"),
            "protobuf": version("protobuf"), "host": platform.node(), "cpus": os.cpu_count()}


# ---- the server ----------------------------------------------------------------------------


def set_up_logging(log_file: Path) -> None:
    """Everything at INFO (the service logs each request's start and end) to a file, as
    `python -m service` logs by default; warnings and errors to stderr too."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.FileHandler(log_file, mode="w")
    to_stderr = logging.StreamHandler()
    to_stderr.setLevel(logging.WARNING)
    for handler in (to_file, to_stderr):
        handler.setFormatter(formatter)
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


async def start_server(engine):
    """TextGenServer around the pre-built engine on 127.0.0.1:<free port>; returns (server, target)."""
    from engine.llm_engine import freeze_startup_objects
    from service.options import build_parser
    from service.server import TextGenServer

    options = build_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--drain-grace-s", "10"])
    server = TextGenServer(options, engine=engine)
    port = await server.start()
    await server.load()
    freeze_startup_objects()  # as `python -m service` does once loaded (service/server.py serve())
    target = f"127.0.0.1:{port}"
    await wait_serving(target)
    return server, target


async def wait_serving(target: str, timeout: float = 60.0) -> None:
    """Poll the standard health service over the wire until it says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout} s")
            await asyncio.sleep(0.1)


async def wait_idle(engine, timeout: float = 60.0) -> None:
    """Until no request runs or waits and no KV block is held (the last pass is fully gone)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine still busy: {s}")
        await asyncio.sleep(0.05)


# ---- main ----------------------------------------------------------------------------------


class Bench:
    """Runs the passes; holds what they share."""

    def __init__(self, args, engine, target: str, pool: ProcessPoolExecutor | None):
        self.args, self.engine, self.target, self.pool = args, engine, target, pool
        self.vocab = engine.info.vocab_size

    async def grpc(self, offsets, prompts, new_tokens: int, tag: str) -> list[dict]:
        call = (self.target, offsets, prompts, new_tokens, tag)
        if self.pool is None:
            return await asyncio.to_thread(client_pass, *call)
        return await asyncio.get_running_loop().run_in_executor(self.pool, client_pass, *call)

    async def in_process(self, offsets, prompts, new_tokens: int, tag: str) -> list[dict]:
        return await engine_pass(self.engine, offsets, prompts, new_tokens, tag)

    async def warm_up(self) -> None:
        """Full-length requests at the highest finite rate through both paths: mixed
        prefill + decode steps at every context length the passes reach (kernels that
        are compiled per shape or split count) and the client process's imports."""
        a = self.args
        if not a.warmup_requests:
            return
        finite = [r for r in a.rates if not math.isinf(r)]
        offsets = arrival_offsets(a.warmup_requests, max(finite) if finite else math.inf, a.seed - 1)
        for seed, (tag, path) in enumerate((("warm-grpc", self.grpc), ("warm-local", self.in_process))):
            # Not -1 - seed: random.Random(-n) is random.Random(n), and seed 1 is the first
            # rate's in-process prompts, which the warm-up then put in the prefix cache
            # (7,168 cached tokens at 4 req/s in the 2026-11-25 runs).
            prompts = random_prompts(a.warmup_requests, a.prompt_len, self.vocab, seed=10**6 + seed)
            await path(offsets, prompts, a.new_tokens, tag)
            await wait_idle(self.engine)

    async def rate(self, index: int, rate: float) -> dict:
        a = self.args
        offsets = arrival_offsets(a.requests, rate, a.seed + index)
        results = {}
        for j, (path, run) in enumerate((("grpc", self.grpc), ("in_process", self.in_process))):
            prompts = random_prompts(a.requests, a.prompt_len, self.vocab, seed=a.seed * 1000 + 10 * index + j)
            records = await run(offsets, prompts, a.new_tokens, f"{path}-r{index}")
            await wait_idle(self.engine)
            results[path] = (summarize(records, a.new_tokens), per_request(records))
        grpc_tok_s, local_tok_s = (results[path][0]["output_tok_s"] for path in ("grpc", "in_process"))
        ratio = grpc_tok_s / local_tok_s if local_tok_s else None
        return {"rate": rate_name(rate), "grpc": results["grpc"][0], "in_process": results["in_process"][0],
                "throughput_ratio": ratio, "meets_target": ratio is not None and ratio >= TARGET_RATIO,
                "requests": {"grpc": results["grpc"][1], "in_process": results["in_process"][1]}}


def print_row(row: dict) -> None:
    for path in ("grpc", "in_process"):
        s = row[path]
        bad = s["errors"] + s["wrong_length"]
        print(f"  rate {row['rate']:>4} {path:<10}: {s['output_tok_s']:9.1f} out tok/s, TTFT p50 "
              f"{ms(s['ttft_p50_s'])} ms, ITL p50 {ms(s['itl_p50_s'])} ms, max send lag {ms(s['max_send_lag_s'])} ms"
              + (f"; {bad} BAD: {s['first_errors']}" if bad else ""), flush=True)
    ratio = row["throughput_ratio"]
    print(f"  rate {row['rate']:>4} gRPC / in-process output tok/s: {'n/a' if ratio is None else f'{ratio:.3f}'}",
          flush=True)


async def run(args) -> dict:
    began = time.perf_counter()
    engine, model = build_async_engine(args)
    print(f"model built in {time.perf_counter() - began:.1f} s: {model['runtime']} on {model['device']}, "
          f"{model['kv_blocks']} KV blocks, step loop in a {model['step_loop']}", flush=True)
    server = None
    pool = None
    try:
        server, target = await start_server(engine)
        print(f"server SERVING on {target}; client: {args.client}", flush=True)
        if args.client == "process":
            import multiprocessing

            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        bench = Bench(args, engine, target, pool)
        await bench.warm_up()
        rows = []
        for index, rate in enumerate(args.rates):
            rows.append(await bench.rate(index, rate))
            print_row(rows[-1])
        config = vars(args) | {"rates": [rate_name(r) for r in args.rates], "target_ratio": TARGET_RATIO}
        return {"environment": environment(), "model": model, "config": config, "results": rows}
    finally:
        if pool is not None:
            pool.shutdown()
        if server is not None:
            await server.drain()  # the server does not own a given engine: it stays up
        await engine.shutdown()


def parse_engine_option(text: str) -> tuple[str, object]:
    """NAME=VALUE for an EngineConfig field; VALUE read as JSON (true, 4096), else a string."""
    name, _, value = text.partition("=")
    try:
        return name.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.replace("-", "_"), value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama on the CPU (checks the script end to end)")
    ap.add_argument("--shape", choices=("llama2-7b", "llama3-8b"), default="llama2-7b")
    ap.add_argument("--rates", type=lambda s: [parse_rate(p) for p in s.split(",")], default="2,8,32,inf",
                    help="requests/s, comma-separated; inf sends all at once")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-requests", type=int, default=None,
                    help="per path, before the measured passes (default: max_num_seqs; 0: none)")
    ap.add_argument("--engine-option", type=parse_engine_option, action="append", default=[], metavar="NAME=VALUE",
                    help="an EngineConfig field for the engine (scheduler) side, e.g. max_num_batched_tokens=4096")
    ap.add_argument("--client", choices=("process", "thread"), default="process",
                    help="where the gRPC client's event loop runs")
    ap.add_argument("--engine-process", action="store_true",
                    help="build and step the engine in a child process (EngineConfig.engine_process), "
                         "so the server's event loop does not share the step loop's GIL")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    args.engine_option = dict(args.engine_option)
    if args.warmup_requests is None:
        args.warmup_requests = args.max_num_seqs
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_up_logging(out / "serve_bench.log")
    report = asyncio.run(run(args))
    env, model = report["environment"], report["model"]
    print(f"\n{env['device']}, torch {env['torch']}, grpcio {env['grpcio']}, {env['date']}; "
          f"{report['config']['requests']} requests x ({args.prompt_len} in, {args.new_tokens} out) per rate; "
          f"{model['runtime']} {model['dtype']}, max_num_seqs {model['max_num_seqs']}, client in a {args.client}, "
          f"step loop in a {model['step_loop']}")
    print(table(report["results"]))
    ratios = [row["throughput_ratio"] for row in report["results"] if row["throughput_ratio"] is not None]
    if ratios:
        print(f"lowest gRPC / in-process output throughput: {min(ratios):.3f} (target >= {TARGET_RATIO})")
    path = out / "serve_bench.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
