"""Tensor parallelism: which slice of each checkpoint tensor a rank holds, and its ModelSpec.

A decoder block splits over N ranks (Megatron's scheme):
- q, k, v projections by output rows (attention heads) and gate/up by output rows (MLP
  columns): each rank computes its own heads and its own slice of the MLP with no
  communication, and rope, attention and SiLU are per head / per column anyway;
- o_proj and down_proj by input columns: each rank's product is a partial sum of the full
  output, and one all-reduce per projection (LlamaModel.forward) completes it. Their
  biases must be added once, so rank 0 holds them and the other ranks a zero bias;
- norms, the embedding and the lm_head stay replicated: they are a small share of a
  model's weights (about 3% of Llama-2-7B each), and replicating them avoids an
  all-gather of logits; only rank 0 computes logits.

KV heads. A rank's q heads are a contiguous range, and q head h reads KV head
h // (q_heads / kv_heads) (GQA). So:
- q_heads % N must be 0;
- if kv_heads % N == 0, each rank gets kv_heads / N KV heads, exactly those its q heads read;
- else if N % kv_heads == 0 (e.g. MQA, or 8 KV heads on 16 ranks), each KV head is
  replicated on N / kv_heads consecutive ranks, and every rank holds the one KV head its
  q heads read (its KV cache then holds that head too);
- else a ValueError naming tensor_parallel_size: no rank would hold whole KV groups.
intermediate_size % N must be 0 as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.runtime.base import ModelSpec


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world_size` holds, in heads and MLP columns."""

    rank: int
    world_size: int
    q_heads: int  # q heads per rank; rank r holds [r * q_heads, (r + 1) * q_heads)
    kv_heads: int  # KV heads this rank holds
    kv_start: int  # the first of them
    intermediate: int  # MLP columns per rank


def check_tensor_parallel(spec: ModelSpec, world_size: int) -> None:
    """Raise ValueError (naming tensor_parallel_size) if spec cannot split over world_size ranks."""
    n, heads, kv = world_size, spec.num_attention_heads, spec.num_key_value_heads
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if heads % n:
        raise ValueError(f"tensor_parallel_size={n} must divide the model's {heads} attention heads")
    if kv % n and n % kv:
        raise ValueError(
            f"tensor_parallel_size={n} cannot split the model's {kv} KV heads: it must divide "
            f"them, or be a multiple of them (each KV head then replicated on {n} / {kv} ranks)"
        )
    if spec.intermediate_size % n:
        raise ValueError(
            f"tensor_parallel_size={n} must divide the model's intermediate_size {spec.intermediate_size}"
        )


def shard_plan(spec: ModelSpec, rank: int, world_size: int) -> ShardPlan:
    check_tensor_parallel(spec, world_size)
    heads, kv = spec.num_attention_heads, spec.num_key_value_heads
    q_local = heads // world_size
    kv_local = kv // world_size if kv % world_size == 0 else 1
    # The KV head read by this rank's first q head; the rest of its q heads read this one
    # or the next kv_local - 1 (they are contiguous, and so are their groups).
    kv_start = rank * q_local * kv // heads
    return ShardPlan(rank, world_size, q_local, kv_local, kv_start, spec.intermediate_size // world_size)


def local_spec(spec: ModelSpec, world_size: int) -> ModelSpec:
    """The spec one rank's model is built from: its heads and MLP columns; same hidden size."""
    plan = shard_plan(spec, 0, world_size)
    return dataclasses.replace(
        spec,
        num_attention_heads=plan.q_heads,
        num_key_value_heads=plan.kv_heads,
        intermediate_size=plan.intermediate,
    )


# A slice rule: ("rows" | "cols", start, stop) on a tensor's first / second axis,
# ("full",) for a replicated tensor, ("rank0",) for a bias that only rank 0 adds.
Rule = tuple


def slice_rule(name: str, spec: ModelSpec, plan: ShardPlan) -> Rule:
    """How rank plan.rank takes checkpoint tensor `name` (HF parameter names)."""
    d = spec.head_dim
    q = (plan.rank * plan.q_heads * d, (plan.rank + 1) * plan.q_heads * d)
    kv = (plan.kv_start * d, (plan.kv_start + plan.kv_heads) * d)
    mlp = (plan.rank * plan.intermediate, (plan.rank + 1) * plan.intermediate)
    kind = name.rsplit(".", 1)[-1]  # "weight" or "bias"
    if ".self_attn.q_proj." in name:
        return ("rows", *q)
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return ("rows", *kv)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return ("rows", *mlp)
    if ".self_attn.o_proj." in name:
        return ("cols", *q) if kind == "weight" else ("rank0",)
    if ".mlp.down_proj." in name:
        return ("cols", *mlp) if kind == "weight" else ("rank0",)
    return ("full",)
