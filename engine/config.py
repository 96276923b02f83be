"""Engine limits and runtime choices, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # Tokens per KV block. 16 keeps prefix reuse fine-grained and block tables short.
    block_size: int = 16
    # KV blocks in the pool. None: size from memory (kv_cache_memory_fraction on CUDA,
    # kv_cache_bytes on CPU).
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.85
    kv_cache_bytes: int = 1 << 30
    # What the KV cache stores: "auto", the model's dtype; or "fp8", e4m3 (CUDA runtime,
    # bf16 or fp16 models), which halves the cache's memory and the bytes that decode
    # attention reads. Values are stored as they are (no scale), clamped to +-448.
    kv_cache_dtype: str = "auto"
    # FP8 weights (use_fp8): let torch._scaled_mm accumulate without promoting the tensor
    # cores' FP8 partial sums to float32 along K, as TensorRT-LLM's and vLLM's FP8 GEMMs
    # do. On the H100 (docs/benchmarks.md) the products took 0.86 to 0.95 of the time, their
    # error against float32 rose from 1.7e-3 to 2.1e-3 (K 4096) and 3.3e-3 (K 14336), and the
    # Llama-3-8B offline run gained 9%. Decodes of up to 64 rows (the Triton GEMV) are the
    # same either way.
    fp8_fast_accum: bool = True
    # FP8 weights (use_fp8) for the LM head too (per-row scales, like the layers'
    # projections; a tied embedding keeps its bf16 copy for the lookup). Off by default, as
    # TensorRT-LLM's and vLLM's FP8 recipes keep the LM head in 16 bits: the logits are
    # what sampling and logprobs read. Measured (docs/benchmarks.md): on the default model
    # (SmolLM2-135M, teacher-forced on 829 tokens) it moved the logits more than all its
    # FP8 layers together (perplexity 9.97 -> 10.23 against 9.85 unquantized, KL 0.015 ->
    # 0.048); on the random 7B on the H100, batch 1 ran 1.014 times as fast (370.5 against
    # 365.4 tok/s, the graph step 39 us shorter).
    fp8_lm_head: bool = False
    # Sequences decoded together in one step, at most.
    max_num_seqs: int = 64
    # Tokens (prefill chunks plus decodes) in one forward pass, at most.
    max_num_batched_tokens: int = 2048
    # Requests admitted but not yet running, at most; beyond it submit() raises QueueFullError.
    max_waiting_requests: int = 1024
    # Context length served; None: the model's own.
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Decode batch sizes the runtime pads to (CUDA graphs are captured per bucket).
    decode_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    use_cuda_graphs: bool = True
    # Prompt lengths (tokens) that the CUDA runtime pads a fresh prompt to, and replays
    # from a CUDA graph captured per length and decode bucket: a step whose prefill is one
    # prompt's first (or only) chunk, with no prefix reused, of up to the largest length
    # here, beside at most 64 decode rows (engine/runtime/cuda/runtime.py). Such a step is
    # otherwise bound by the host (about 400 launches for 32 layers: on the H100 a
    # 128-token 7B prefill took 10 ms in bf16 and 15 ms in FP8 with the device busy 4 to
    # 6 ms of them, docs/benchmarks.md): the time to first token, and the pause of every
    # other stream while a new prompt goes in. Padding rows write no K/V and no prompt row
    # attends to a later one, so the prompt's rows are computed as unpadded, though the
    # projections' matrix products may round differently at another row count. Empty: off.
    prefill_graph_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    # While at most this many requests wait, a step takes in one fresh prompt at most, when
    # the runtime replays such steps from a graph (ModelRuntime.prompt_graph_limits; the
    # CUDA runtime with prefill graphs). Two prompts in one step run eagerly, bound by the
    # host: on the H100 (7B bf16, 16 req/s, docs/benchmarks.md) a step of two 128-token
    # prompts beside 8 to 12 decode rows took 17 to 34 ms, against 2 to 6 ms for a graph
    # step of one, and every running stream waited for it. From a longer queue, one eager
    # step of many prompts finishes them sooner than one step each. 0: off.
    single_prompt_max_waiting: int = 8
    # Capture every decode bucket's and prefill shape's CUDA graph while loading instead of
    # on first use (on the H100 about 0.1 to 4 s a decode graph and 0.1 to 0.2 s a prefill
    # graph, which a request would otherwise wait for). The server turns it on; in-process
    # models capture lazily.
    capture_graphs_at_start: bool = False
    # Launch step N+1 before reading step N's tokens back, so that the host's work per
    # step (scheduling, batch building, stop checks, streaming) overlaps the device's.
    # Steps that need their tokens on the host first (beams, repetition penalties) are
    # read back at once. Same tokens either way; False reads every step back at once.
    overlap_steps: bool = True
    # Seconds without a finished step, while work is pending, before the watchdog
    # declares the engine stuck.
    watchdog_timeout_s: float = 120.0
    # Python's generation-0 garbage-collection threshold, raised to at least this when an
    # engine starts (the setting is the process's); None leaves it alone. A step at 512
    # sequences allocates about 9,000 container objects, nearly all freed by reference
    # counting within the step: at the interpreter's default of 700 that ran 12 collections
    # a step, 16% of the host's time per step (bench/host_bench.py, docs/benchmarks.md).
    gc_threshold: int | None = 10_000
    # Ranks (devices of one host) the model is split over by heads and MLP columns; 1: no
    # split. See engine/parallel/sharding.py for what must divide by it.
    tensor_parallel_size: int = 1
    # Serve CUDA through engine/runtime/cuda (CUDA graphs, Triton attention, FP8); False
    # falls back to the plain TorchRuntime. On since its logits matched transformers'
    # within bf16's noise floor on the H100 (docs/benchmarks.md; the failure reported
    # before was the check's, see there).
    experimental_cuda_runtime: bool = True
    # Run the step loop in a child process of its own (engine/engine_process.py) instead
    # of a thread beside the caller. A server's event loop and the step thread otherwise
    # share one GIL: at 64 streams each waits for the other's Python work, and streamed
    # throughput fell to 0.82-0.94 of the engine's own (bench/serve_bench.py). Costs a
    # process start (seconds: the child imports torch and loads the weights) and a pickled
    # message per step.
    engine_process: bool = False

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting_requests",
                    "tensor_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.single_prompt_max_waiting < 0:
            raise ValueError(f"single_prompt_max_waiting must be >= 0, got {self.single_prompt_max_waiting}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.engine_process and self.tensor_parallel_size > 1:
            # The tensor-parallel runtime starts rank processes of its own, which the
            # engine process (a daemon process) may not do.
            raise ValueError("engine_process cannot be combined with tensor_parallel_size > 1")
        for name in ("decode_buckets", "prefill_graph_tokens"):
            if any(not isinstance(n, int) or n < 1 for n in getattr(self, name)):
                raise ValueError(f"{name} must hold positive integers, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def max_in_flight(self) -> int:
        """Requests admitted at once (running plus waiting); submit() refuses more."""
        return self.max_num_seqs + self.max_waiting_requests

    @classmethod
    def from_options(cls, **options) -> tuple["EngineConfig", dict]:
        """Split keyword options into this config's fields and the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names}
        return cls(**mine), rest
