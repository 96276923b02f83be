"""Llama-family decoder (llama, mistral, qwen2) over a paged KV cache, in plain torch.

No nn.Module: the forward is a flat loop of functional ops over weights prepared once,
because on CPU at batch 1 the per-op dispatch cost is a visible share of a token's time.
Numerics follow transformers (RMSNorm in float32, its rotate-half rope computed pairwise
in an interleaved layout, see rope.py, softmax scale 1/sqrt(head_dim)) so fp32 greedy
decoding agrees with it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.models.rope import RopeTable, interleave_rope_rows
from engine.runtime.attention import AttentionMetadata, paged_attention
from engine.runtime.base import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked on the output axis, q/k rope-interleaved
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked on the output axis
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class MissingWeightError(KeyError):
    """A parameter the spec needs is absent from the checkpoint."""


def _fuse(weights: dict, names: list[str], required: bool, dtype, device) -> torch.Tensor | None:
    present = [n in weights for n in names]
    if not any(present) and not required:
        return None
    missing = [n for n, p in zip(names, present) if not p]
    if missing:
        raise MissingWeightError(f"checkpoint lacks {', '.join(missing)}")
    # One concatenated matrix means one GEMM per layer instead of three (or two).
    return torch.cat([weights[n].to(dtype) for n in names]).to(device).contiguous()


def _get(weights: dict, name: str, dtype, device, required: bool = True) -> torch.Tensor | None:
    if name not in weights:
        if required:
            raise MissingWeightError(f"checkpoint lacks {name}")
        return None
    return weights[name].to(dtype=dtype, device=device).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # One call instead of six; same math as below (float32 throughout), only the sum
        # order of the reduction may differ, at the 1e-7 level.
        return F.rms_norm(x, weight.shape, weight, eps)
    # transformers: normalise in float32, cast back, then scale by the weight.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device):
        self.spec = spec
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.eps = spec.rms_norm_eps
        self.embed = _get(weights, "model.embed_tokens.weight", dtype, device)
        self.norm = _get(weights, "model.norm.weight", dtype, device)
        head = None if spec.tie_word_embeddings else _get(weights, "lm_head.weight", dtype, device, required=False)
        # Some tied checkpoints still store lm_head.weight; tie when it is absent either way.
        self.lm_head = self.embed if head is None else head
        self.layers = [self._layer(weights, i, dtype, device) for i in range(spec.num_hidden_layers)]
        self.rope = RopeTable(spec, spec.max_position_embeddings, dtype, device)

    def _layer(self, w: dict, i: int, dtype, device) -> LayerWeights:
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv = [attn + f"{n}_proj" for n in "qkv"]
        gate_up = [mlp + "gate_proj", mlp + "up_proj"]
        return LayerWeights(
            input_norm=_get(w, p + "input_layernorm.weight", dtype, device),
            qkv=self._fuse_qkv(_fuse(w, [n + ".weight" for n in qkv], True, dtype, device)),
            qkv_bias=self._fuse_qkv(_fuse(w, [n + ".bias" for n in qkv], self.spec.attention_bias, dtype, device)),
            # qwen2 has q/k/v biases but none on o_proj, so o_proj's bias is optional.
            o=_get(w, attn + "o_proj.weight", dtype, device),
            o_bias=_get(w, attn + "o_proj.bias", dtype, device, required=False),
            post_norm=_get(w, p + "post_attention_layernorm.weight", dtype, device),
            gate_up=_fuse(w, [n + ".weight" for n in gate_up], True, dtype, device),
            gate_up_bias=_fuse(w, [n + ".bias" for n in gate_up], self.spec.mlp_bias, dtype, device),
            down=_get(w, mlp + "down_proj.weight", dtype, device),
            down_bias=_get(w, mlp + "down_proj.bias", dtype, device, required=self.spec.mlp_bias),
        )

    def _fuse_qkv(self, fused: torch.Tensor | None) -> torch.Tensor | None:
        """Interleave the q and k rows of a fused qkv weight or bias for the rope layout."""
        if fused is None:
            return None
        d = self.head_dim
        q, k, v = fused.split([self.heads * d, self.kv_heads * d, self.kv_heads * d])
        return torch.cat([interleave_rope_rows(q, self.heads), interleave_rope_rows(k, self.kv_heads), v])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states through every layer; logits (model dtype) for logits_indices rows only."""
        n = input_ids.shape[0]
        heads = self.heads
        rope = self.rope.lookup(positions)  # per token, shared by all q and k heads
        h = F.embedding(input_ids, self.embed)
        for layer, cache in zip(self.layers, kv_caches):
            x = rms_norm(h, layer.input_norm, self.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias).view(n, -1, self.head_dim)  # heads: q | k | v
            # q and k sit side by side in qkv, so one in-place call rotates both.
            self.rope.apply_(qkv[:, : heads + self.kv_heads], rope)
            attn = paged_attention(qkv[:, :heads], qkv[:, heads:], cache, meta, self.scale)
            h.add_(F.linear(attn, layer.o, layer.o_bias))
            x = rms_norm(h, layer.post_norm, self.eps)
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            h.add_(F.linear(F.silu(gate, inplace=True) * up, layer.down, layer.down_bias))
        # Norm and lm_head only over the rows that are sampled: the lm_head is the biggest
        # matrix and most prefill rows need no logits.
        rows = rms_norm(h[logits_indices], self.norm, self.eps)
        return F.linear(rows, self.lm_head)
