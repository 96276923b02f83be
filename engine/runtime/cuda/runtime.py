"""ModelRuntime for CUDA devices: Triton decode kernels, CUDA graphs, optional FP8 weights.

Decode-only steps run a static-shape step padded to the smallest bucket of
EngineConfig.decode_buckets that fits: inputs are copied into fixed buffers (token ids,
positions, slots, block tables padded to the longest context, context lengths; padding
rows write no K/V and attend to nothing), and the step is replayed from a CUDA graph
captured per bucket on first use. With use_cuda_graphs=False the same padded step runs
eagerly, so graph and eager decoding give the same tokens.

A step whose prefill is one fresh prompt (no reused prefix, no earlier chunk) of up to
max(EngineConfig.prefill_graph_tokens) tokens, beside up to PREFILL_GRAPH_MAX_DECODES
decode rows, is replayed from a graph too: the decode rows padded to their bucket, the
prompt to the next of those lengths (prefill_graph.py picks the shape; without graphs the
same padded step runs eagerly). Padding rows write no K/V (slot -1) and the causal
attention keeps the prompt's padding out of its own rows.
Every other step with prefill chunks runs eagerly (cuBLAS projections, SDPA or varlen
FlashAttention for prefill, the Triton kernel for its decode rows).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.models.weights import MissingWeightError
from engine.runtime.base import ForwardBatch, ModelRuntime, ModelSpec, PromptGraphLimits, apply_token_feed
from engine.runtime.cuda import compile_watch
from engine.runtime.cuda.kernels import (
    GREEDY_BANS,
    GREEDY_FEW_ROWS,
    decode_splits,
    fill_decode_inputs,
    greedy_with_logprob,
    num_sms,
)
from engine.runtime.cuda.model import CudaLlama, DecodeInputs
from engine.runtime.cuda.prefill_graph import prefill_graph_shape
from engine.runtime.kv_copy import copy_kv_blocks

logger = logging.getLogger(__name__)

# Decode rows that a step may hold beside the prompt and still replay a prefill graph. Each
# decode bucket up to it times each prompt length is a graph of its own (48 with the
# defaults and max_num_seqs 64, about 0.1 s each to capture on the H100); at more rows the
# step's device time grows and the host's share of an eager step shrinks.
PREFILL_GRAPH_MAX_DECODES = 64


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmuls need compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class CudaRuntime(ModelRuntime):
    # A decode step's in-flight tokens are written by the kernel that fills the graph's
    # static inputs (no index_select and index_copy launches of their own a step).
    fuses_token_feed = True

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, use_fp8: bool = False, config: EngineConfig | None = None,
                 max_model_len: int | None = None):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        config = config or EngineConfig()
        compile_watch.install()
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
                                       fast_accum=config.fp8_fast_accum, fp8_lm_head=config.fp8_lm_head)
        except MissingWeightError as e:
            raise ModelLoadError(f"incomplete {spec.architecture} checkpoint: {e.args[0]}") from None
        self.block_size = 0
        self.kv_cache: torch.Tensor | None = None
        self._layer_caches: list[torch.Tensor] = []
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graph_tokens = sorted(set(config.prefill_graph_tokens))
        # Decode rows a prefill graph may hold beside its prompt: none, or a decode bucket.
        self._prefill_graph_rows = [0] + [b for b in self.buckets if b <= PREFILL_GRAPH_MAX_DECODES]
        # (decode rows, prompt tokens) -> (graph, logits [rows + 1, vocab], the rows it takes them from)
        self._prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if self.use_cuda_graphs and self.prefill_graph_tokens and spec.sliding_window is None:
            self.prompt_graph_limits = PromptGraphLimits(self.prefill_graph_tokens[-1], self._prefill_graph_rows[-1])
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
        # A prefill graph's prompt rows follow its decode bucket's rows in the same buffers.
        rows = self.buckets[-1]
        tokens = rows + (self.prefill_graph_tokens[-1] if self.prefill_graph_tokens else 0)
        self.max_blocks = -(-self.max_model_len // block_size)
        new = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=self.device)  # noqa: E731
        self._ids, self._pos, self._slots, self._ctx = new(tokens), new(tokens), new(tokens), new(rows)
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
            apply_token_feed(batch)
            shape = self._prefill_graph_shape(batch)
            if shape is not None:
                return self._padded_prefill(batch, *shape)
            return self._eager(batch)

    def _prefill_graph_shape(self, batch: ForwardBatch) -> tuple[int, int] | None:
        return prefill_graph_shape(batch, self._prefill_graph_rows, self.prefill_graph_tokens,
                                   self.spec.sliding_window)

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
        self._fill_decode_rows(batch)
        self._pad_rows_from(n)
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

    def _fill_decode_rows(self, batch: ForwardBatch) -> None:
        """Rows [0, n) of the static inputs from the step's n decode rows."""
        width = min(batch.decode_block_tables.shape[1], self.max_blocks)
        fill_decode_inputs(batch.input_ids, batch.positions, batch.slot_mapping, batch.decode_context_lens,
                           batch.decode_block_tables[:, :width], self._static_inputs(), feed=batch.token_feed)

    def _static_inputs(self) -> tuple[torch.Tensor, ...]:
        """The graphs' input buffers, in fill_decode_inputs' order."""
        return self._ids, self._pos, self._slots, self._ctx, self._tables

    def _pad_rows_from(self, n: int) -> None:
        """Rows from n on that an earlier step filled become padding again (no K/V write,
        an empty context); the rows before n are this step's."""
        if self._live_rows > n:
            self._slots[n : self._live_rows].fill_(-1)
            self._ctx[n : self._live_rows].zero_()
        self._live_rows = n

    def _prefill_step(self, rows: int, tokens: int, logits_rows: torch.Tensor) -> torch.Tensor:
        """`rows` decode rows (possibly none) and a fresh prompt of `tokens` rows after them,
        from the static inputs; the logits (model dtype) of logits_rows."""
        decode = DecodeInputs(self._tables[:rows], self._ctx[:rows], self._splits(rows)) if rows else None
        end = rows + tokens
        return self.model.forward(self._ids[:end], self._pos[:end], self._slots[:end], self._layer_caches, decode,
                                  rows, [(rows, tokens, tokens, [])], logits_rows)

    def _padded_prefill(self, batch: ForwardBatch, rows: int, tokens: int) -> torch.Tensor:
        """The step padded to `rows` decode rows and `tokens` prompt rows, replayed from its
        graph (or, with use_cuda_graphs=False, run eagerly at the same shapes: the same
        logits)."""
        if self.use_cuda_graphs:
            if (rows, tokens) not in self._prefill_graphs:
                self._capture_prefill(rows, tokens)
            graph, logits, logits_rows = self._prefill_graphs[(rows, tokens)]
        else:
            graph, logits_rows = None, torch.arange(rows + 1, device=self.device)
        n = batch.num_decodes
        length = batch.prefill_chunks[0][1]
        if n:
            self._fill_decode_rows(batch)
        self._pad_rows_from(n)  # decode rows [n, rows) are padding
        start, end = rows, rows + length
        self._ids[start:end].copy_(batch.input_ids[n:])
        self._pos[start:end].copy_(batch.positions[n:])
        self._slots[start:end].copy_(batch.slot_mapping[n:])
        if length < tokens:  # prompt padding: no K/V written, a valid rope position
            self._slots[end : rows + tokens].fill_(-1)
            self._pos[end : rows + tokens].zero_()
        self._live_rows = rows + tokens
        sampled = batch.logits_indices.shape[0]
        if sampled:  # the prompt's last row, after the decode bucket's rows
            logits_rows[rows].fill_(end - 1)
        if graph is not None:
            graph.replay()
        else:
            logits = self._prefill_step(rows, tokens, logits_rows)
        # The graph's logits are the decode bucket's rows, then the prompt's last. Each of
        # the step's rows samples at most once, in order: n + 1 rows sampled are all of them.
        if sampled == n + 1:
            return logits[: n + 1] if n == rows else torch.cat([logits[:n], logits[rows:]])
        if sampled == 0:
            return logits[:0]
        picked = batch.logits_indices
        return logits.index_select(0, torch.where(picked < n, picked, rows))

    def _capture_prefill(self, rows: int, tokens: int) -> None:
        start = time.perf_counter()
        # Every row padding (slot -1, empty context): the warm-up run (kernel compilation,
        # cuBLAS and attention plans) writes nothing into the cache. The step's own rows
        # are filled after.
        self._pad_rows_from(0)
        self._slots[: rows + tokens].fill_(-1)
        self._pos[rows : rows + tokens].zero_()
        self._live_rows = rows + tokens
        logits_rows = torch.arange(rows + 1, device=self.device)
        graph, logits = self._record(lambda: self._prefill_step(rows, tokens, logits_rows))
        self._prefill_graphs[(rows, tokens)] = (graph, logits, logits_rows)
        self.capture_seconds += time.perf_counter() - start
        logger.info("captured the prefill CUDA graph for %d decode rows and %d prompt tokens in %.2f s", rows, tokens,
                    time.perf_counter() - start)

    def _capture(self, rows: int) -> None:
        start = time.perf_counter()
        # With every row made padding (slot -1, empty context) the warm-up run (kernel
        # compilation) writes nothing into the cache; the real rows come back after.
        saved = self._slots[:rows].clone(), self._ctx[:rows].clone()
        self._slots[:rows].fill_(-1)
        self._ctx[:rows].zero_()
        graph, logits = self._record(lambda: self._static_step(rows))
        self._slots[:rows].copy_(saved[0])
        self._ctx[:rows].copy_(saved[1])
        self._graphs[rows] = (graph, logits)
        self.capture_seconds += time.perf_counter() - start
        logger.info("captured the decode CUDA graph for batch %d in %.2f s", rows, time.perf_counter() - start)

    def _record(self, step) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run `step` once (kernel compilation, cuBLAS and attention plans), then capture it
        into a graph that shares every other graph's memory pool; its output buffer too."""
        step()
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        return graph, out

    def _warm_eager_steps(self) -> None:
        """Run the eager step's kernel variants once: two prompts beside one, two or three
        decode rows (the decode attention's launch mode follows the row count), over
        contexts of one block and of max_model_len (one context split, or several). The
        graphs' captures miss some of them: their split count follows max_model_len, an
        eager step's its longest context. Nothing is written to the cache (slots -1)."""
        prompt = 8

        def new(*shape, fill=0):
            return torch.full(shape, fill, dtype=torch.int64, device=self.device)

        for rows in sorted({min(n, self.buckets[-1]) for n in (1, 2, 3)}):
            for width in sorted({1, self.max_blocks}):
                tokens = rows + 2 * prompt
                batch = ForwardBatch(
                    input_ids=new(tokens), positions=new(tokens), slot_mapping=new(tokens, fill=-1), num_decodes=rows,
                    decode_block_tables=new(rows, width),
                    decode_context_lens=new(rows, fill=min(width * self.block_size, self.max_model_len)),
                    prefill_chunks=[(rows + i * prompt, prompt, prompt, [0] * -(-prompt // self.block_size))
                                    for i in range(2)],
                    logits_indices=torch.tensor([*range(rows), rows + prompt - 1, tokens - 1], device=self.device))
                self._eager(batch)

    def drop_graphs(self) -> None:
        """Forget the captured graphs; later captures go to a new memory pool. (Capturing
        again into the old pool, once its graphs were gone, failed torch 2.11's caching
        allocator assert `use_count > 0` in bench/gpu_bench.py on the H100.)"""
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._pool = None

    def warm_up(self) -> None:
        """Capture every decode bucket's and prefill shape's graph now instead of on first use,
        and compile what the captures do not: the eager steps' kernel variants
        (_warm_eager_steps) and the kernels outside the graphs (the sampler's greedy choice,
        the static inputs' fill)."""
        with torch.inference_mode():
            if self.use_cuda_graphs:
                for rows in reversed(self.buckets):
                    if rows not in self._graphs:
                        self._capture(rows)
                for rows in reversed(self._prefill_graph_rows):
                    for tokens in reversed(self.prefill_graph_tokens):
                        if (rows, tokens) not in self._prefill_graphs:
                            self._capture_prefill(rows, tokens)
            if self.device.type == "cuda":
                # For the logits of graph steps (model dtype) and of eager ones (float32):
                # compiled now, not by the first request that samples them.
                # With and without min_new_tokens' banned ids (GREEDY_BANS of them), for few
                # rows and for more (two tile sizes).
                no_bans = torch.full((GREEDY_BANS,), -1, dtype=torch.int64, device=self.device)
                for dtype in dict.fromkeys((self.dtype, torch.float32)):
                    for rows in (1, GREEDY_FEW_ROWS + 1):
                        logits = torch.zeros(rows, self.spec.vocab_size, dtype=dtype, device=self.device)
                        greedy_with_logprob(logits)
                        greedy_with_logprob(logits, no_bans)
                if self.kv_cache is not None:
                    # The static inputs' fill, outside the graphs (row 0 onto itself), and the eager steps.
                    fill_decode_inputs(self._ids[:1], self._pos[:1], self._slots[:1], self._ctx[:1],
                                       self._tables[:1, :1], self._static_inputs())
                    self._warm_eager_steps()
        # From here on a Triton compilation stalls serving: compile_watch warns about each.
        compile_watch.WATCH.mark_warm()

