"""Read-only facts about a loaded engine: the model and the live counters."""

from __future__ import annotations

from dataclasses import dataclass

from engine.params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str  # "llama", "mistral", "qwen2"
    dtype: str  # "float32", "bfloat16"
    fp8: bool  # True only when FP8 weights are really in use
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    # The model's defaults (generation_config.json over transformers' defaults).
    default_params: SamplingParams


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in the running batch
    waiting: int  # requests admitted, not yet running (incl. preempted and just submitted)
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    preemptions_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int  # of those, tokens found cached
    steps_total: int
    healthy: bool
