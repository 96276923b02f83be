"""Llama-family decoder (llama, mistral, qwen2) over a paged KV cache, in plain torch.

No nn.Module: the forward is a flat loop of functional ops over weights prepared once,
because on CPU at batch 1 the per-op dispatch cost is a visible share of a token's time.
Numerics follow transformers (RMSNorm in float32, its rotate-half rope computed pairwise
in an interleaved layout, see rope.py, softmax scale 1/sqrt(head_dim)) so fp32 greedy
decoding agrees with it token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.models.rope import RopeTable, interleave_rope_rows
from engine.models.weights import WeightReader
from engine.runtime.attention import AttentionMetadata, paged_attention
from engine.runtime.base import ModelSpec

logger = logging.getLogger(__name__)

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
                 device: torch.device, group=None):
        self.spec = spec
        # Tensor parallelism (engine/parallel/): this rank's heads and MLP columns only, so
        # o_proj and down_proj give partial sums that `group` all-reduces. None: one rank.
        self.group = group
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.eps = spec.rms_norm_eps
        w = WeightReader(weights, dtype, device)
        # The embedding is looked up by rows, so it keeps the checkpoint's layout; the
        # lm_head gets the matmul layout, a second copy when the two are tied.
        (embed,) = w.get(["model.embed_tokens.weight"])
        self.embed = embed.to(device).contiguous()
        self.norm = w.vector(["model.norm.weight"])
        head = None if spec.tie_word_embeddings else w.get(["lm_head.weight"], required=False)
        if head is None and not spec.tie_word_embeddings:
            # Seen in checkpoints saved from tied models: better tied than random.
            logger.warning("config says untied embeddings but there is no lm_head.weight; tying them")
        self.lm_head = w.matrix(head or [embed])
        self.layers = [self._layer(w, i) for i in range(spec.num_hidden_layers)]
        self.rope = RopeTable(spec, spec.max_position_embeddings, dtype, device)

    def _layer(self, w: WeightReader, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        qkv = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        gate_up = [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]
        return LayerWeights(
            input_norm=w.vector([p + "input_layernorm.weight"]),
            qkv=w.matrix(self._interleave_qk(w.get([n + ".weight" for n in qkv]))),
            qkv_bias=self._qkv_bias(w, [n + ".bias" for n in qkv]),
            o=w.matrix(w.get([p + "self_attn.o_proj.weight"])),
            # qwen2 has q/k/v biases but none on o_proj, so o_proj's bias is optional.
            o_bias=w.vector([p + "self_attn.o_proj.bias"], required=False),
            post_norm=w.vector([p + "post_attention_layernorm.weight"]),
            gate_up=w.matrix(w.get([n + ".weight" for n in gate_up])),
            gate_up_bias=w.vector([n + ".bias" for n in gate_up], required=self.spec.mlp_bias),
            down=w.matrix(w.get([p + "mlp.down_proj.weight"])),
            down_bias=w.vector([p + "mlp.down_proj.bias"], required=self.spec.mlp_bias),
        )

    def _interleave_qk(self, qkv: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reorder q and k output rows (weights or biases) for the interleaved rope layout."""
        q, k, v = qkv
        return [interleave_rope_rows(q, self.heads), interleave_rope_rows(k, self.kv_heads), v]

    def _qkv_bias(self, w: WeightReader, names: list[str]) -> torch.Tensor | None:
        parts = w.get(names, required=self.spec.attention_bias)
        return None if parts is None else torch.cat(self._interleave_qk(parts)).to(w.device)

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
            h.add_(self._all_reduce(F.linear(attn, layer.o, layer.o_bias)))
            x = rms_norm(h, layer.post_norm, self.eps)
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            h.add_(self._all_reduce(F.linear(F.silu(gate, inplace=True) * up, layer.down, layer.down_bias)))
        # Norm and lm_head only over the rows that are sampled: the lm_head is the biggest
        # matrix and most prefill rows need no logits.
        rows = rms_norm(h[logits_indices], self.norm, self.eps)
        return F.linear(rows, self.lm_head)

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            self.group.allreduce([partial]).wait()
        return partial
