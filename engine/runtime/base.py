"""The runtime interface: what the engine needs from whatever runs the model.

The scheduler and the model runner speak only `ForwardBatch` and logits, so a
TensorRT-LLM (or any other) backend can replace `TorchRuntime` by implementing
`ModelRuntime`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    """Shape and numerics of a Llama-family decoder, read from its config."""

    architecture: str  # "llama", "mistral" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # qwen2 has q/k/v biases
    mlp_bias: bool = False
    # transformers' rope_scaling dict (e.g. {"rope_type": "llama3", ...}) or None.
    rope_scaling: dict | None = None
    sliding_window: int | None = None


@dataclass
class ForwardBatch:
    """One forward pass over a packed batch of sequences.

    Tokens of all scheduled sequences are flattened into one axis of length T.
    Decode sequences (one query token each) come first, then prefill chunks.
    Token i of the batch is written into KV slot `slot_mapping[i]`
    (block_id * block_size + offset) before attention reads the cache.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    # Decode part: the first num_decodes tokens, one per sequence.
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32/64, padded with 0
    decode_context_lens: torch.Tensor  # [num_decodes] int64, KV length including this token
    # Prefill part: for each chunk, (query_start, query_len, context_len, block_table).
    # context_len counts the KV tokens after this step, so the chunk's first token sits at
    # position context_len - query_len.
    prefill_chunks: list[tuple[int, int, int, list[int]]]
    # Rows (token indices) whose logits are needed, in the order the sampler wants them.
    logits_indices: torch.Tensor  # [S] int64
    # Tokens still on the device that input_ids must take before use (None: none, or
    # already in): only for runtimes with fuses_token_feed, which apply it (apply_token_feed)
    # or fuse it into a kernel of their own; input_ids holds 0 at those rows until then.
    token_feed: TokenFeed | None = None


@dataclass
class TokenFeed:
    """input_ids[to[i]] = tokens[from_[i]]: the last sampled tokens of sequences whose step
    is still in flight (the engine's overlapped steps), copied on the device."""

    tokens: torch.Tensor  # [R] int64, a launched step's samples
    to: torch.Tensor  # [F] int64, rows of input_ids
    from_: torch.Tensor  # [F] int64, rows of tokens


def apply_token_feed(batch: ForwardBatch) -> None:
    """Copy a batch's pending token feed into its input_ids (no-op without one)."""
    feed = batch.token_feed
    if feed is not None:
        batch.input_ids.index_copy_(0, feed.to, feed.tokens.index_select(0, feed.from_))
        batch.token_feed = None


@dataclass(frozen=True)
class PromptGraphLimits:
    """The steps a runtime replays from a captured graph although they hold a prompt: one
    fresh prompt (no reused prefix, no earlier chunk) of up to `max_tokens` tokens beside
    up to `max_decodes` decode rows. Other steps with a prompt run eagerly."""

    max_tokens: int
    max_decodes: int


class ModelRuntime(abc.ABC):
    """Runs a model over a paged KV cache."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    # Set by runtimes that replay one-prompt steps from graphs (the scheduler then keeps
    # prompts apart while few wait: EngineConfig.single_prompt_max_waiting).
    prompt_graph_limits: PromptGraphLimits | None = None
    # True for runtimes that take a batch's token_feed themselves (see ForwardBatch); the
    # engine applies it before execute() for every other runtime.
    fuses_token_feed: bool = False

    @abc.abstractmethod
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block takes across all layers (keys and values)."""

    @abc.abstractmethod
    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the KV pool. Called once before the first execute()."""

    @abc.abstractmethod
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one forward pass; return logits [len(logits_indices), vocab] in float32 or the
        model's dtype (the sampler widens them where it needs float32). They may live in a
        buffer the runtime reuses: read or copy them before the next execute() call (work
        queued on the device's stream before that call counts as read)."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook, deliberately empty by default
        """Prepare everything the first steps would otherwise pay for (CUDA graphs); after
        init_kv_cache(), before serving. Nothing by default."""

    @abc.abstractmethod
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV block src into block dst for each (src, dst): copy-on-write for beams."""
