"""ModelRuntime for CUDA devices: Triton decode kernels, CUDA graphs, optional FP8 weights.

Decode-only steps run a static-shape step padded to the smallest bucket of
EngineConfig.decode_buckets that fits: inputs are copied into fixed buffers (token ids,
positions, slots, block tables padded to the longest context, context lengths; padding
rows write no K/V and attend to nothing), and the step is replayed from a CUDA graph
captured per bucket on first use. With use_cuda_graphs=False the same padded step runs
eagerly, so graph and eager decoding give the same tokens. Steps with prefill chunks run
eagerly (cuBLAS projections, batched SDPA for prefill, the Triton kernel for their
decode rows).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.models.weights import MissingWeightError
from engine.runtime.base import ForwardBatch, ModelRuntime, ModelSpec
from engine.runtime.cuda.kernels import decode_splits, fill_decode_inputs, num_sms
from engine.runtime.cuda.model import CudaLlama, DecodeInputs
from engine.runtime.kv_copy import copy_kv_blocks

logger = logging.getLogger(__name__)


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmuls need compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class CudaRuntime(ModelRuntime):
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, use_fp8: bool = False, config: EngineConfig | None = None,
                 max_model_len: int | None = None):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        config = config or EngineConfig()
        self.use_cuda_graphs = config.use_cuda_graphs and self.device.type == "cuda"
        self.max_model_len = max_model_len or spec.max_position_embeddings
        buckets = sorted(set(config.decode_buckets))
        # Buckets up to the first that holds max_num_seqs; larger decode batches run eagerly.
        self.buckets = [b for b in buckets if b < config.max_num_seqs] + [b for b in buckets if b >= config.max_num_seqs][:1]
        self.fp8_enabled = bool(use_fp8 and fp8_supported(self.device))
        self.kv_dtype = dtype
        if config.kv_cache_dtype == "fp8":
            if not fp8_supported(self.device) or dtype not in (torch.bfloat16, torch.float16):
                raise ValueError("kv_cache_dtype: 'fp8' needs a bf16 or fp16 model on a CUDA GPU of compute "
                                 f"capability 8.9 or newer (model dtype {str(dtype).removeprefix('torch.')})")
            self.kv_dtype = torch.float8_e4m3fn
        if use_fp8 and not self.fp8_enabled:
            logger.warning("FP8 needs a CUDA GPU of compute capability 8.9 or newer; running in %s instead",
                           str(dtype).removeprefix("torch."))
        try:
            with torch.inference_mode():
                self.model = CudaLlama(spec, weights, dtype, self.device, fp8=self.fp8_enabled,
                                       fast_accum=config.fp8_fast_accum)
        except MissingWeightError as e:
            raise ModelLoadError(f"incomplete {spec.architecture} checkpoint: {e.args[0]}") from None
        self.block_size = 0
        self.kv_cache: torch.Tensor | None = None
        self._layer_caches: list[torch.Tensor] = []
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_seconds = 0.0

    # ---- KV pool ------------------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        s = self.spec
        return 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * block_size * self.kv_dtype.itemsize

    def num_kv_blocks(self, config: EngineConfig, max_model_len: int | None = None) -> int:
        """KV blocks for a kv_cache_memory_fraction of the GPU memory free now (after the
        weights), capped at what max_num_seqs sequences of max_model_len tokens could use."""
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = self.kv_cache_bytes_per_block(config.block_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.kv_cache_memory_fraction)
        else:
            free = total = budget = config.kv_cache_bytes
        blocks = budget // per_block
        if max_model_len is not None:
            blocks = min(blocks, config.max_num_seqs * -(-max_model_len // config.block_size))
        blocks = max(1, blocks)
        self.kv_pool_report = (f"KV pool: {blocks} blocks of {config.block_size} tokens = {blocks * per_block / 2**30:.2f} GiB "
                               f"({blocks * config.block_size} tokens); {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                               f"free after the weights, budget {config.kv_cache_memory_fraction:.0%} of free")
        logger.info(self.kv_pool_report)
        return blocks

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        s = self.spec
        # Zeroed as bytes, as the cache's FP8 copies and gathers are done (engine/runtime/kv_copy.py).
        self.kv_cache = torch.zeros(s.num_hidden_layers, num_blocks, block_size, 2 * s.num_key_value_heads,
                                    s.head_dim * self.kv_dtype.itemsize, dtype=torch.uint8,
                                    device=self.device).view(self.kv_dtype)
        self.block_size = block_size
        self._layer_caches = list(self.kv_cache)
        # Static decode inputs, sized for the largest bucket and the longest context.
        rows = self.buckets[-1]
        self.max_blocks = -(-self.max_model_len // block_size)
        new = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=self.device)  # noqa: E731
        self._ids, self._pos, self._slots, self._ctx = new(rows), new(rows), new(rows), new(rows)
        self._tables = new(rows, self.max_blocks)
        self._slots.fill_(-1)
        self._live_rows = 0  # rows of the static buffers that may hold a real slot or context
        self.drop_graphs()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        copy_kv_blocks(self.kv_cache, pairs)

    # ---- forward ------------------------------------------------------------------------
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("init_kv_cache() must be called before execute()")
        n = batch.num_decodes
        with torch.inference_mode():
            if n and not batch.prefill_chunks and n <= self.buckets[-1]:
                return self._decode(batch)
            return self._eager(batch)

    def _splits(self, rows: int) -> int:
        return decode_splits(rows, self.spec.num_key_value_heads, self.max_model_len, num_sms(self.device))

    def _eager(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_decodes
        decode = None
        if n:
            longest = batch.decode_block_tables.shape[1] * self.block_size
            splits = decode_splits(n, self.spec.num_key_value_heads, longest, num_sms(self.device))
            decode = DecodeInputs(batch.decode_block_tables, batch.decode_context_lens, splits)
        logits = self.model.forward(batch.input_ids, batch.positions, batch.slot_mapping, self._layer_caches, decode,
                                    n, batch.prefill_chunks, batch.logits_indices)
        return logits.float()

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _static_step(self, rows: int) -> torch.Tensor:
        """Logits in the model's dtype: the float32 copy that execute() hands out is made
        after the replay, so that the conversion and the copy are one pass."""
        decode = DecodeInputs(self._tables[:rows], self._ctx[:rows], self._splits(rows))
        return self.model.forward(self._ids[:rows], self._pos[:rows], self._slots[:rows], self._layer_caches,
                                  decode, rows, [], None)

    def _decode(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_decodes
        rows = self.bucket_for(n)
        width = min(batch.decode_block_tables.shape[1], self.max_blocks)
        fill_decode_inputs(batch.input_ids, batch.positions, batch.slot_mapping, batch.decode_context_lens,
                           batch.decode_block_tables[:, :width],
                           (self._ids, self._pos, self._slots, self._ctx, self._tables))
        if self._live_rows > n:  # rows a larger batch used: padding again (no K/V write, empty context)
            self._slots[n : self._live_rows].fill_(-1)
            self._ctx[n : self._live_rows].zero_()
        self._live_rows = n
        if self.use_cuda_graphs:
            if rows not in self._graphs:
                self._capture(rows)
            graph, logits = self._graphs[rows]
            graph.replay()
        else:
            logits = self._static_step(rows)
        # The graph's own output buffer, in the model's dtype, when every decode row samples
        # (rows 0..n-1): execute()'s contract lets the next replay overwrite it, and the
        # engine's sampler reads it before then. A float32 copy here (before: a conversion
        # of 512 x 128k logits a Llama-3-8B step, 262 MB written) is left to the sampler,
        # which makes one only for rows that need processing; plain greedy rows are chosen
        # from the model-dtype logits directly.
        if batch.logits_indices.shape[0] == n:
            return logits[:n]
        return logits.index_select(0, batch.logits_indices)

    def _capture(self, rows: int) -> None:
        start = time.perf_counter()
        # With every row made padding (slot -1, empty context) the warm-up run (kernel
        # compilation) writes nothing into the cache; the real rows come back after.
        saved = self._slots[:rows].clone(), self._ctx[:rows].clone()
        self._slots[:rows].fill_(-1)
        self._ctx[:rows].zero_()
        self._static_step(rows)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._static_step(rows)
        self._slots[:rows].copy_(saved[0])
        self._ctx[:rows].copy_(saved[1])
        self._graphs[rows] = (graph, logits)
        self.capture_seconds += time.perf_counter() - start
        logger.info("captured the decode CUDA graph for batch %d in %.2f s", rows, time.perf_counter() - start)

    def drop_graphs(self) -> None:
        """Forget the captured graphs; later captures go to a new memory pool. (Capturing
        again into the old pool, once its graphs were gone, failed torch 2.11's caching
        allocator assert `use_count > 0` in bench/gpu_bench.py on the H100.)"""
        self._graphs.clear()
        self._pool = None

    def warm_up(self) -> None:
        """Capture every bucket's graph now instead of on first use."""
        if self.use_cuda_graphs:
            with torch.inference_mode():
                for rows in reversed(self.buckets):
                    if rows not in self._graphs:
                        self._capture(rows)
