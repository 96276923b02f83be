"""Llama-family decoder (llama, mistral, qwen2) for the CUDA runtime.

The same function as engine/models/llama.py (fused q|k|v with rope-interleaved q/k
rows, fused gate|up, transformers' bf16 rounding order), with the per-layer work in
few launches: each projection is one cuBLAS GEMM or, at decode batch sizes, one Triton
kernel that also adds the residual after it (and, for a few rows, does the RMSNorm or
the SiLU * up before it); rope and the K/V cache write are one kernel; decode attention is one Triton
kernel (plus a combine when the context is split); prefill attention is one varlen
FlashAttention call over all of a step's chunks (engine/runtime/cuda/prefill.py), or SDPA
for fresh chunks of one length and in float32. Every decode-path op has static
shapes for a given batch bucket, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.models.rope import interleave_rope_rows, inv_freq
from engine.models.weights import MissingWeightError
from engine.runtime.base import ModelSpec
from engine.runtime.cuda import kernels
from engine.runtime.cuda.fp8 import Fp8Weight, quantize_rows, scaled_mm_linear
from engine.runtime.cuda.kernels import gemv, paged_decode_attention, rms_norm, rope_and_cache, silu_mul
from engine.runtime.cuda.prefill import PrefillInputs, gather_rows, prefill_attention, prefill_inputs
from engine.runtime.cuda.prefill import available as flash_prefill_available
from engine.transfer import to_device


@dataclass
class CudaLayer:
    input_norm: torch.Tensor
    qkv: torch.Tensor | Fp8Weight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | Fp8Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor | Fp8Weight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | Fp8Weight
    down_bias: torch.Tensor | None


@dataclass
class DecodeInputs:
    """The decode part of a step: rows [0, n) of the batch, one query token each."""

    tables: torch.Tensor  # [n, max_blocks] int64
    context_lens: torch.Tensor  # [n] int64, 0 for padding rows
    splits: int  # context splits of the attention kernel


class CudaLlama:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, fp8: bool = False, fast_accum: bool = False, fp8_lm_head: bool = False):
        self.spec, self.dtype, self.device, self.fp8 = spec, dtype, device, fp8
        self.fast_accum = fast_accum  # torch._scaled_mm's use_fast_accum for FP8 weights
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        # Decode-only steps of up to this many rows: rope and the K/V cache write inside the
        # attention kernel (one launch a layer fewer). Measured on the H100 (captured steps,
        # six runs, docs/benchmarks.md): 7B batch 1 0.996 to 1.001 times as long in bf16,
        # 0.986 to 1.002 in FP8; batch 2 0.995 to 1.001 and 0.969 to 0.999; batch 32 1.000
        # to 1.007; Llama-3-8B at 512 rows 1.018 (each program's rope adds a dependent load
        # before its tiles). 0 turns it off (the bench compares).
        self.rope_in_attention_rows = 2
        self._use_flash_prefill = flash_prefill_available(dtype, device)
        self.eps = spec.rms_norm_eps
        self._weights = weights
        self.embed = self._get("model.embed_tokens.weight").contiguous()
        self.norm = self._get("model.norm.weight")
        if spec.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = self.embed  # [vocab, hidden] is already F.linear's layout
        else:
            self.lm_head = self._get("lm_head.weight").contiguous()
        if fp8 and fp8_lm_head:  # its own FP8 copy: a tied embedding's lookup stays in the model dtype
            self.lm_head = quantize_rows(self.lm_head)
        self.layers = [self._layer(i) for i in range(spec.num_hidden_layers)]
        del self._weights
        # cos | sin per position for the interleaved layout, like transformers computes them
        # (float32 angles and cos/sin on the device, then cast to the model dtype).
        positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32, device=device)
        angles = positions[:, None] * inv_freq(spec).to(device)[None, :]
        self.rope_table = torch.stack([angles.cos(), angles.sin()]).to(dtype).contiguous()  # [2, P, d/2]

    # ---- weights ----------------------------------------------------------------------
    def _get(self, name: str, required: bool = True) -> torch.Tensor | None:
        if name not in self._weights:
            if not required:
                return None
            raise MissingWeightError(f"checkpoint lacks {name}")
        return self._weights[name].to(device=self.device, dtype=self.dtype)

    def _cat(self, names: list[str], required: bool = True, rope_heads: tuple[int, ...] = ()) -> torch.Tensor | None:
        parts = [self._get(n, required) for n in names]
        if any(p is None for p in parts):
            if required or any(p is not None for p in parts):
                missing = [n for n, p in zip(names, parts) if p is None]
                raise MissingWeightError(f"checkpoint lacks {', '.join(missing)}")
            return None
        parts = [interleave_rope_rows(p, rope_heads[i]) if i < len(rope_heads) else p for i, p in enumerate(parts)]
        return torch.cat(parts).contiguous()

    def _matrix(self, w: torch.Tensor) -> torch.Tensor | Fp8Weight:
        return quantize_rows(w) if self.fp8 else w

    def _layer(self, i: int) -> CudaLayer:
        p = f"model.layers.{i}."
        qkv = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        rope = (self.heads, self.kv_heads)
        gate_up = [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]
        return CudaLayer(
            input_norm=self._get(p + "input_layernorm.weight"),
            qkv=self._matrix(self._cat([n + ".weight" for n in qkv], rope_heads=rope)),
            qkv_bias=self._cat([n + ".bias" for n in qkv], required=self.spec.attention_bias, rope_heads=rope),
            o=self._matrix(self._get(p + "self_attn.o_proj.weight").contiguous()),
            o_bias=self._get(p + "self_attn.o_proj.bias", required=False),
            post_norm=self._get(p + "post_attention_layernorm.weight"),
            gate_up=self._matrix(self._cat([n + ".weight" for n in gate_up])),
            gate_up_bias=self._cat([n + ".bias" for n in gate_up], required=self.spec.mlp_bias),
            down=self._matrix(self._get(p + "mlp.down_proj.weight").contiguous()),
            down_bias=self._get(p + "mlp.down_proj.bias", required=False),
        )

    def weight_bytes(self) -> int:
        def size(w):
            if w is None:
                return 0
            if isinstance(w, Fp8Weight):
                return w.q.numel() + w.scale.numel() * 4
            return w.numel() * w.element_size()

        total = size(self.embed) + size(self.norm) + (0 if self.lm_head is self.embed else size(self.lm_head))
        for layer in self.layers:
            total += sum(size(getattr(layer, f)) for f in layer.__dataclass_fields__)
        return total

    # ---- ops --------------------------------------------------------------------------
    @staticmethod
    def _skinny(x: torch.Tensor, w) -> bool:
        """Whether x @ w.T runs through the Triton decode projections (else cuBLAS or _scaled_mm)."""
        rows = x.shape[0]
        return 0 < rows <= kernels.SKINNY_ROWS.get(1 if isinstance(w, Fp8Weight) else w.element_size(), 64)

    def linear(self, x: torch.Tensor, w, *, norm: torch.Tensor | None = None, act: bool = False,
               bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
        """f(x) @ w.T (+ bias) (+ residual, in place), f = RMSNorm(norm) or SiLU(gate) * up.
        add: a deferred residual branch (residual_linear's result), added into x first."""
        skinny = self._skinny(x, w)
        fused_add = isinstance(w, Fp8Weight) and not skinny and norm is not None
        if add is not None and not fused_add:
            x.add_(add)
        if skinny:
            q, scale = (w.q, w.scale) if isinstance(w, Fp8Weight) else (w, None)
            return gemv(x, q, scale=scale, norm=norm, eps=self.eps, act=act, bias=bias, residual=residual,
                        out=residual)
        if isinstance(w, Fp8Weight):  # the norm or SiLU (and `add`) fused into the activations' quantization
            y = scaled_mm_linear(x, w, bias, norm=norm, eps=self.eps, act=act, add=add if fused_add else None,
                                 fast_accum=self.fast_accum)
        else:
            if norm is not None:
                x = rms_norm(x, norm, self.eps)
            if act:
                x = silu_mul(x)
            y = F.linear(x, w, bias)
        if residual is None:
            return y
        return residual.add_(y)

    def residual_linear(self, x: torch.Tensor, w, residual: torch.Tensor, *, act: bool = False,
                        bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """residual += f(x) @ w.T, now (None returned), or, on the FP8 _scaled_mm path, later:
        the branch is returned for the next projection's `add`, whose activation quantization
        adds it in the same pass (one read of the residual stream fewer per layer and
        projection, and one kernel fewer)."""
        if isinstance(w, Fp8Weight) and not self._skinny(x, w):
            return self.linear(x, w, act=act, bias=bias)
        self.linear(x, w, act=act, bias=bias, residual=residual)
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                kv_caches: list[torch.Tensor], decode: DecodeInputs | None, num_decodes: int,
                prefill: list[tuple[int, int, int, list[int]]], logits_rows: torch.Tensor | None) -> torch.Tensor:
        """Logits (model dtype) of logits_rows (None: every row)."""
        h = F.embedding(input_ids, self.embed)
        flash = self._flash_prefill(prefill, kv_caches[0].shape[1])
        branch = None  # a residual branch not yet added into h (see residual_linear)
        # A few decode rows only: the attention kernel does rope_and_cache's work too.
        fused_rope = not prefill and input_ids.shape[0] <= self.rope_in_attention_rows
        rope = (positions, slot_mapping, self.rope_table) if fused_rope else None
        for layer, cache in zip(self.layers, kv_caches):
            qkv = self.linear(h, layer.qkv, norm=layer.input_norm, bias=layer.qkv_bias, add=branch)
            if not fused_rope:
                rope_and_cache(qkv, positions, slot_mapping, self.rope_table, cache, self.heads, self.kv_heads,
                               self.head_dim)
            attn = self._attention(qkv, cache, decode, num_decodes, prefill, flash, rope)
            branch = self.residual_linear(attn, layer.o, h, bias=layer.o_bias)
            gate_up = self.linear(h, layer.gate_up, norm=layer.post_norm, bias=layer.gate_up_bias, add=branch)
            branch = self.residual_linear(gate_up, layer.down, h, act=True, bias=layer.down_bias)
        if branch is not None:
            h.add_(branch)
        rows = h if logits_rows is None else h.index_select(0, logits_rows)
        return self.linear(rows, self.lm_head, norm=self.norm)

    # ---- attention --------------------------------------------------------------------
    def _flash_prefill(self, prefill: list, block_size: int) -> PrefillInputs | None:
        """The step's prefill chunks as one varlen FlashAttention call, or None for SDPA.

        Fresh chunks of one length stay with one batched SDPA call, which measured 2.5x
        faster than varlen on the H100 (35 against 85 us for 32 chunks of 128 tokens, bf16;
        SDPA picks a Hopper kernel there). Every other mix (lengths that differ, chunks
        after a cached prefix) is one varlen call instead of one SDPA call per chunk."""
        if not prefill or not self._use_flash_prefill:
            return None
        qlen = prefill[0][1]
        if self.spec.sliding_window is None and all(q == qlen and ctx == q for _, q, ctx, _ in prefill):
            return None
        return prefill_inputs(prefill, block_size, self.device)

    def _attention(self, qkv: torch.Tensor, cache: torch.Tensor, decode: DecodeInputs | None, n: int,
                   prefill: list, flash: PrefillInputs | None, rope: tuple | None = None) -> torch.Tensor:
        """rope (decode-only steps): paged_decode_attention's, for q and K/V not yet rotated
        nor written to the cache."""
        H, D = self.heads, self.head_dim
        window = self.spec.sliding_window
        if not prefill:
            return paged_decode_attention(qkv, cache, decode.tables, decode.context_lens, H, self.kv_heads, D,
                                          self.scale, decode.splits, window, rope=rope)
        out = qkv.new_empty(qkv.shape[0], H * D)
        if n:
            paged_decode_attention(qkv[:n], cache, decode.tables, decode.context_lens, H, self.kv_heads, D,
                                   self.scale, decode.splits, window, out=out[:n])
        if flash is not None:
            out[flash.start : flash.start + flash.rows] = prefill_attention(qkv, cache, flash, H, self.kv_heads, D,
                                                                            self.scale, window)
            return out
        for start, count, qlen, group in self._prefill_groups(prefill):
            out[start : start + count * qlen] = self._prefill(qkv, cache, start, count, qlen, group)
        return out

    def _prefill_groups(self, prefill):
        """Runs of consecutive chunks with no cached prefix and equal length run as one
        batched SDPA call; other chunks alone. Yields (start, count, query_len, chunks)."""
        run: list = []
        for chunk in prefill:
            start, qlen, ctx_len, _ = chunk
            fresh = ctx_len == qlen and self.spec.sliding_window is None
            if run and fresh and qlen == run[0][1] and start == run[-1][0] + qlen:
                run.append(chunk)
                continue
            if run:
                yield run[0][0], len(run), run[0][1], run
                run = []
            if fresh:
                run = [chunk]
            else:
                yield start, 1, qlen, [chunk]
        if run:
            yield run[0][0], len(run), run[0][1], run

    def _prefill(self, qkv, cache, start, count, qlen, chunks) -> torch.Tensor:
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        rows = qkv[start : start + count * qlen].unflatten(0, (count, qlen))  # [n, Q, (H + 2 KVH) D]
        q = rows[..., : H * D].unflatten(-1, (H, D)).transpose(1, 2)  # [n, H, Q, D]
        _, _, ctx_len, blocks = chunks[0]
        offset = ctx_len - qlen
        if count > 1 or (offset == 0 and self.spec.sliding_window is None):
            k = rows[..., H * D : (H + KVH) * D].unflatten(-1, (KVH, D)).transpose(1, 2)
            v = rows[..., (H + KVH) * D :].unflatten(-1, (KVH, D)).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            block_size = cache.shape[1]
            if offset == 0:
                context = rows[0, :, H * D :].unflatten(-1, (2 * KVH, D))
            else:
                used = to_device(blocks[: -(-ctx_len // block_size)], torch.int64, qkv.device)
                context = gather_rows(cache, used, q.dtype).flatten(0, 1)[:ctx_len]  # [ctx, 2 KVH, D]
            k = context[:, :KVH].transpose(0, 1)[None]
            v = context[:, KVH:].transpose(0, 1)[None]
            q_pos = torch.arange(offset, ctx_len, device=qkv.device)[:, None]
            kv_pos = torch.arange(ctx_len, device=qkv.device)[None, :]
            mask = kv_pos <= q_pos
            if self.spec.sliding_window is not None:
                mask &= kv_pos > q_pos - self.spec.sliding_window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(count * qlen, H * D)
