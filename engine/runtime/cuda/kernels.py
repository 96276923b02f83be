"""Triton kernels of the CUDA runtime.

* `gemv`: y = x @ W.T for decode batches (<= SKINNY_MAX_ROWS rows), bandwidth-bound:
  an FMA loop for 1-2 rows, a tensor-core kernel that streams the weight through a
  software pipeline for more, with optional fusions: RMSNorm of the input, SiLU(gate) * up
  of the input (both for up to FUSE_MAX_ROWS rows), a bias, a residual add of the output,
  FP8 (e4m3) weights with per-row scales.
* `rms_norm`, `silu_mul`: the same fused prologues, stand-alone for the cuBLAS path.
* `rope_and_cache`: rotary embedding of q and k in place plus the K/V write into the paged
  cache, one launch per layer.
* `paged_decode_attention`: one query token per sequence against its K/V blocks read in
  place from the paged cache; GQA-aware (the query heads of a KV head share each K/V
  tile); optionally split over the context (flash-decoding) with a combine kernel.

Numerics follow the torch path (transformers' order of bf16 roundings): RMSNorm in
float32, rounded, then times the weight and rounded; rope products and sums rounded one
by one; SiLU rounded before the multiply by `up`; residual adds after the rounding of
the projection. Accumulation is float32 everywhere. The rope kernels launch without FMA
contraction, which had fused a product into the following sum (see _rotate_pairs).

Under TRITON_INTERPRET=1 (CPU tests) bf16 `tl.dot` is not emulated correctly, so dots
then run on float32 operands.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.runtime.base import TokenFeed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programmatic dependent launch (Hopper and later): in steps of up to PDL_MAX_ROWS rows
# the kernels are launched so that each may start while the kernel before it drains,
# instead of after it. Each such kernel calls _await_inputs before it reads anything an
# earlier kernel wrote (the projections first start loading their weights, which nothing
# writes). Measured on the H100 (docs/benchmarks.md): the batch-1 step 3 to 5% shorter in
# bf16, 5 to 9% in FP8; at 4 rows 0.993 to 1.037 times as long, at 32 rows 0.995 to 1.051.
# At 2 rows, with the 2-D accumulator GEMV, 0.959 to 0.964 in bf16 against 1.005 to 1.009 in
# FP8 (three runs): so steps of one and two rows launch under PDL.
# PDL None: decided at the first launch from the device (compute capability >= 9); the
# bench sets it to compare.
PDL: bool | None = None
PDL_MAX_ROWS = 2
# In steps of up to this many rows each PDL kernel lets the next one launch before it
# waits for its own inputs, rather than after: a kernel's programs then become resident
# (and start streaming their first weight tiles) while the kernel two back still runs.
# Safe because every program's wait is for the full completion of the kernel before it,
# which itself waited in the same way; and the next kernel can launch only once every
# program of this one has been scheduled. Measured on the H100 (7B, captured steps, three
# runs): one row 0.994 to 0.995 times as long in bf16, 0.998 to 0.999 in FP8; two rows
# 1.001 to 1.003 in bf16 and 1.016 to 1.018 in FP8.
PDL_EARLY_TRIGGER_MAX_ROWS = 1
# Decode batches up to this many rows get the RMSNorm / SiLU * up fused into the projection
# kernel (each program re-reads the whole input rows, cheap only for a few rows). At 4 rows
# the fused FMA kernel's step (7B, H100) took 7.5 ms in bf16 and 6.6 ms in FP8 at best,
# against 5.9 and 5.8 ms for 8 rows through separate RMSNorm / SiLU kernels and the
# tensor-core kernel; at 2 rows the fused FMA kernel was the fastest (5.7 and 4.7 ms).
FUSE_MAX_ROWS = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pdl(rows: int) -> bool:
    """Whether a kernel over `rows` rows (tokens, sequences) is launched under PDL."""
    global PDL
    if PDL is None:
        PDL = not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    return PDL and rows <= PDL_MAX_ROWS


def _pdl_launch(rows: int) -> dict:
    """A launch's keywords for PDL: the kernel's own mode (0: off, 1: wait then let the
    next kernel launch, 2: the other way round; see PDL_EARLY_TRIGGER_MAX_ROWS) and
    Triton's launch option."""
    pdl = _pdl(rows)
    return {"PDL": (2 if rows <= PDL_EARLY_TRIGGER_MAX_ROWS else 1) if pdl else 0, "launch_pdl": pdl}


@triton.jit
def _await_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel has finished and
    its writes are visible (through it, every earlier one's: it waited too), and let the
    next kernel launch (before the wait or after: PDL 2 or 1). Every program of a
    PDL-launched kernel must pass here before it reads an earlier kernel's output or
    writes anything."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL == 1:
        gdc_wait()
        gdc_launch_dependents()


# ---------------------------------------------------------------------------------------
# GEMV
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_rstd(x_ptr, M, stride_x, eps, K: tl.constexpr, K_POW2: tl.constexpr, M_PAD: tl.constexpr,
              ROWS: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of rows [0, min(M, ROWS)) as an [M_PAD] vector, each row
    read in one load (all rows' loads in flight together)."""
    k = tl.arange(0, K_POW2)
    rm = tl.arange(0, M_PAD)
    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    for m in tl.static_range(ROWS):
        xv = tl.load(x_ptr + m * stride_x + k, mask=(k < K) & (m < M), other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=0) / K + eps)
        rstd = tl.where(rm == m, r, rstd)
    return rstd


@triton.jit
def _input_tile(x_rows, nw_ptr, out_ptr, kk, k_mask, x_mask, rstd, K: tl.constexpr, ACT: tl.constexpr,
                NORM: tl.constexpr):
    """Columns kk of f(x), rounded to the output dtype where torch rounds: f is SiLU(gate) * up
    (ACT: x holds [gate | up], each K wide), then RMSNorm times its weight (NORM)."""
    dt = out_ptr.dtype.element_ty
    if ACT:
        g = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        xv = (s * u).to(dt)
    else:
        xv = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
    if NORM:
        xv = _norm_tile(xv, nw_ptr, kk, k_mask, rstd, dt)
    return xv


@triton.jit
def _norm_tile(xv, nw_ptr, kk, k_mask, rstd, dt: tl.constexpr):
    """RMSNorm of the rows xv (columns kk, 1 / rms in rstd) times its weight, rounded to dt
    where torch rounds: after the normalization and after the weight."""
    nw = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
    xn = (xv.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32)
    return (xn * nw[None, :]).to(dt)


@triton.jit
def _weight_epilogue(bias_ptr, scale_ptr, rn, n_mask, BIAS: tl.constexpr, FP8: tl.constexpr):
    """The FP8 row scales and the bias of a program's output columns (ones and zeros where
    absent). Both are weights, so programs read them before their wait for the inputs: read
    after the products, as the epilogue used to, each was one more memory round trip at the
    end of every program, on the step's path through the last program of each launch."""
    scale = tl.full(rn.shape, 1.0, dtype=tl.float32)
    if FP8:
        scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0)
    bias = tl.zeros(rn.shape, dtype=tl.float32)
    if BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    return scale, bias


@triton.jit
def _residual_tile(res_ptr, rm, m_mask, rn, n_mask, stride_res, RES: tl.constexpr):
    """The residual rows [rows, cols] a projection adds, read as soon as the program's wait
    returns (the kernel before may write them) so that the read overlaps the products."""
    r = tl.zeros([rm.shape[0], rn.shape[0]], dtype=tl.float32)
    if RES:
        o_mask = m_mask[:, None] & n_mask[None, :]
        r = tl.load(res_ptr + rm[:, None] * stride_res + rn[None, :], mask=o_mask, other=0.0).to(tl.float32)
    return r


@triton.jit
def _store_projection(y, out_ptr, res, scale, bias, rm, m_mask, rn, n_mask, stride_out,
                      RES: tl.constexpr, BIAS: tl.constexpr, FP8: tl.constexpr):
    """y [rows, cols] float32 accumulators: times the FP8 row scales, plus the bias, rounded,
    plus the residual (after the rounding, as torch adds it), stored. scale, bias: from
    _weight_epilogue; res: from _residual_tile."""
    dt = out_ptr.dtype.element_ty
    if FP8:
        y = y * scale[None, :]
    if BIAS:
        y = y + bias[None, :]
    y = y.to(dt)
    o_mask = m_mask[:, None] & n_mask[None, :]
    if RES:
        y = (y.to(tl.float32) + res).to(dt)
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y, mask=o_mask)


@triton.jit
def _program_tiles(x_ptr, w_ptr, M, N, stride_x, K: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """A projection program's output columns rn (and mask), input rows rm (and mask), K
    offsets rk, and the row pointers of x and of its BLOCK_N weight rows."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, M_PAD)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None] * stride_x
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    return rn, rn < N, rm, rm < M, rk, x_rows, w_rows


@triton.jit
def _one_row(x_ptr, m, stride_x):
    """Row m of x as a [1, 1] pointer tile: the 2-D shape the prologue helpers take."""
    return (x_ptr + m * stride_x + tl.zeros([1], dtype=tl.int64))[:, None]


@triton.jit
def _one_row_rstd(x_row, M, m, eps, K: tl.constexpr, K_POW2: tl.constexpr):
    """RMSNorm's 1 / sqrt(mean(x^2) + eps) of row m as a [1] vector, in one load."""
    k = tl.arange(0, K_POW2)
    xv = tl.load(x_row + k[None, :], mask=(k < K)[None, :] & (m < M), other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / K + eps)


@triton.jit
def _row_fma(acc, squares, w, x_row, nw_ptr, out_ptr, kk, M, m, rstd, K: tl.constexpr, ACT: tl.constexpr,
             NORM: tl.constexpr, LATE_RSTD: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K] += w * f(x[m]) columns kk (broadcast over the weight rows).
    LATE_RSTD (with NORM): f(x) is x times the norm weight, unrounded, and squares [1, BLOCK_K]
    accumulates x^2 for the 1 / rms applied after the sum (see _gemv_kernel)."""
    k_mask = kk < K
    x_mask = k_mask[None, :] & (m < M)
    if NORM and LATE_RSTD:
        xv = tl.load(x_row + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        squares += xv * xv
        xv = xv * tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    else:
        xv = _input_tile(x_row, nw_ptr, out_ptr, kk, k_mask, x_mask, rstd, K, ACT, NORM).to(tl.float32)
    return acc + w.to(tl.float32) * xv, squares


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, bias_ptr, scale_ptr,
                 M, N, stride_x, stride_out, stride_res, eps,
                 K: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr, BIAS: tl.constexpr,
                 FP8: tl.constexpr, K_POW2: tl.constexpr, STAGES: tl.constexpr, PRELOAD: tl.constexpr,
                 LATE_RSTD: tl.constexpr, EARLY_EPILOGUE: tl.constexpr, PDL: tl.constexpr):
    """y = f(x) @ w.T for one or two rows on the FMA units: one [BLOCK_N, BLOCK_K] float32
    accumulator per row. (One [rows, BLOCK_N, BLOCK_K] accumulator, as this kernel had
    before, gave the products a layout of one element per thread along K: the compiler
    then read each pipelined weight tile back from shared memory one byte or half-word at
    a time, 64 loads per thread and tile, and FP8 steps were bound by instruction issue.)

    LATE_RSTD (with NORM): RMSNorm's 1 / rms is factored out of the sum, y = (w @ (x * nw))
    / rms(x), with the squares summed from the same x tiles: no pass over the row before
    the first product (a load and a reduction every program waited on) and no rounding of
    the normalized row to the model dtype (torch rounds x / rms, then its product with nw).

    EARLY_EPILOGUE: the row scales and bias are read before the wait and the residual right
    after it (see _weight_epilogue); otherwise all three after the products."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    # Each weight byte is read once: keep it out of the caches' way. The first PRELOAD (1
    # or 2) tiles are requested before the wait for the inputs, so that under PDL they
    # stream in while the kernels before finish.
    w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0,
                eviction_policy="evict_first")
    w_next = w
    if PRELOAD > 1:
        w_next = tl.load(w_rows + BLOCK_K + rk[None, :], mask=n_mask[:, None] & (BLOCK_K + rk < K)[None, :],
                         other=0.0, eviction_policy="evict_first")
    if EARLY_EPILOGUE:
        scale, bias = _weight_epilogue(bias_ptr, scale_ptr, rn, n_mask, BIAS, FP8)
    _await_inputs(PDL)
    rm = tl.arange(0, M_PAD)
    if EARLY_EPILOGUE:
        res = _residual_tile(res_ptr, rm, rm < M, rn, n_mask, stride_res, RES)
    x0 = _one_row(x_ptr, 0, stride_x)
    x1 = _one_row(x_ptr, 1, stride_x)
    r0 = tl.zeros([1], dtype=tl.float32)
    r1 = tl.zeros([1], dtype=tl.float32)
    if NORM and not LATE_RSTD:
        r0 = _one_row_rstd(x0, M, 0, eps, K, K_POW2)
        if M_PAD > 1:
            r1 = _one_row_rstd(x1, M, 1, eps, K, K_POW2)
    sq0 = tl.zeros([1, BLOCK_K], dtype=tl.float32)
    sq1 = tl.zeros([1, BLOCK_K], dtype=tl.float32)
    acc0, sq0 = _row_fma(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), sq0, w, x0, nw_ptr, out_ptr, rk, M, 0, r0,
                         K, ACT, NORM, LATE_RSTD)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if M_PAD > 1:
        acc1, sq1 = _row_fma(acc1, sq1, w, x1, nw_ptr, out_ptr, rk, M, 1, r1, K, ACT, NORM, LATE_RSTD)
    if PRELOAD > 1:
        acc0, sq0 = _row_fma(acc0, sq0, w_next, x0, nw_ptr, out_ptr, BLOCK_K + rk, M, 0, r0, K, ACT, NORM,
                             LATE_RSTD)
        if M_PAD > 1:
            acc1, sq1 = _row_fma(acc1, sq1, w_next, x1, nw_ptr, out_ptr, BLOCK_K + rk, M, 1, r1, K, ACT, NORM,
                                 LATE_RSTD)
    # STAGES > 1 lets the compiler issue the next tiles' loads before this one's FMAs.
    for k0 in tl.range(PRELOAD * BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc0, sq0 = _row_fma(acc0, sq0, w, x0, nw_ptr, out_ptr, kk, M, 0, r0, K, ACT, NORM, LATE_RSTD)
        if M_PAD > 1:
            acc1, sq1 = _row_fma(acc1, sq1, w, x1, nw_ptr, out_ptr, kk, M, 1, r1, K, ACT, NORM, LATE_RSTD)
    y0 = tl.sum(acc0, axis=1)
    y1 = tl.sum(acc1, axis=1)
    if NORM and LATE_RSTD:
        y0 = y0 / tl.sqrt(tl.sum(sq0, axis=1) / K + eps)
        y1 = y1 / tl.sqrt(tl.sum(sq1, axis=1) / K + eps)
    y = tl.where(rm[:, None] == 0, y0[None, :], y1[None, :])
    if not EARLY_EPILOGUE:
        scale, bias = _weight_epilogue(bias_ptr, scale_ptr, rn, n_mask, BIAS, FP8)
        res = _residual_tile(res_ptr, rm, rm < M, rn, n_mask, stride_res, RES)
    _store_projection(y, out_ptr, res, scale, bias, rm, rm < M, rn, n_mask, stride_out, RES, BIAS, FP8)


@triton.jit
def _dot_tile(acc, w, x_rows, nw_ptr, out_ptr, kk, m_mask, rstd, K: tl.constexpr, ACT: tl.constexpr,
              NORM: tl.constexpr, F32_DOT: tl.constexpr):
    dt = out_ptr.dtype.element_ty
    k_mask = kk < K
    x_mask = m_mask[:, None] & k_mask[None, :]
    xv = _input_tile(x_rows, nw_ptr, out_ptr, kk, k_mask, x_mask, rstd, K, ACT, NORM)
    if F32_DOT:
        return tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    # FP8 e4m3 values are exact in bf16/fp16: the products stay exact.
    return tl.dot(xv, tl.trans(w.to(dt)), acc)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, bias_ptr, scale_ptr,
                   M, N, stride_x, stride_out, stride_res, eps,
                   K: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   STAGES: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr,
                   BIAS: tl.constexpr, FP8: tl.constexpr, F32_DOT: tl.constexpr, K_POW2: tl.constexpr,
                   NORM_ROWS: tl.constexpr, PDL: tl.constexpr):
    """The same function as _gemv_kernel on the tensor cores: x rows padded to M_PAD (>= 16)
    and the weight tiles streamed through a STAGES-deep software pipeline, which keeps
    more bytes in flight per SM than the FMA loop does."""
    rn, n_mask, rm, m_mask, rk, x_rows, w_rows = _program_tiles(x_ptr, w_ptr, M, N, stride_x, K, M_PAD, BLOCK_N,
                                                                BLOCK_K)
    w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)  # before the wait
    scale, bias = _weight_epilogue(bias_ptr, scale_ptr, rn, n_mask, BIAS, FP8)
    _await_inputs(PDL)
    res = _residual_tile(res_ptr, rm, m_mask, rn, n_mask, stride_res, RES)
    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if NORM:  # whole rows in one load each (the caller fuses the norm for <= NORM_ROWS rows)
        rstd = _row_rstd(x_ptr, M, stride_x, eps, K, K_POW2, M_PAD, NORM_ROWS)
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    acc = _dot_tile(acc, w, x_rows, nw_ptr, out_ptr, rk, m_mask, rstd, K, ACT, NORM, F32_DOT)
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        acc = _dot_tile(acc, w, x_rows, nw_ptr, out_ptr, kk, m_mask, rstd, K, ACT, NORM, F32_DOT)
    _store_projection(acc, out_ptr, res, scale, bias, rm, m_mask, rn, n_mask, stride_out, RES, BIAS, FP8)


# Decode projections run through these kernels up to SKINNY_MAX_ROWS rows (cuBLAS or
# _scaled_mm above). Config per (weight bytes per element, rows bucket):
# ("fma", BLOCK_N, BLOCK_K, num_warps[, stages]) for _gemv_kernel (up to FUSE_MAX_ROWS
# rows) or ("dot", BLOCK_N, BLOCK_K, num_warps, stages) for _skinny_kernel. The one- and
# two-row tiles were chosen inside the model (whole captured steps, bench/gpu_bench.py's
# tune_in_model / tune_small_batches / tune_shapes on the 7B shape, H100, numbers in
# docs/benchmarks.md): the isolated sweeps (--sweep) miss the fused prologues and the
# overlap of back-to-back launches, and ranked tiles differently. At one row the FMA kernel
# beat the tensor-core kernel by 10% (bf16) and 40% (FP8) in the model; pipelining its
# loop (stages > 1) gave 3% and 12% more.
SKINNY_MAX_ROWS = 64
# Largest row count sent to the Triton kernels, per weight bytes per element (above it:
# cuBLAS for bf16, torch._scaled_mm for FP8). At 32 rows cuBLAS matched the tensor-core
# kernel in bf16 (and beat it on the down projection); _scaled_mm with row-wise scales
# was 1.7 to 8x slower than the FP8 kernel.
SKINNY_ROWS = {2: 16, 1: 64}
GEMV_CONFIG = {
    (2, 1): ("fma", 8, 1024, 4, 3), (1, 1): ("fma", 8, 1024, 4, 3),
    (2, 2): ("fma", 4, 1024, 4, 4), (1, 2): ("fma", 16, 256, 4, 6),
    (2, 16): ("dot", 32, 256, 4, 4), (1, 16): ("dot", 16, 256, 4, 4),
    (2, 32): ("dot", 32, 256, 4, 4), (1, 32): ("dot", 16, 256, 4, 4),
    (2, 64): ("dot", 32, 256, 4, 4), (1, 64): ("dot", 16, 256, 4, 4),
}


# Steps of up to this many rows load two weight tiles per GEMV program before the wait for
# the inputs instead of one, per weight bytes per element. Measured on the H100 (7B,
# captured steps, against one tile, both with the early trigger; two runs): FP8 one row
# 0.976 / 0.983 times as long, two rows 1.037 / 1.040; bf16 one row 1.009 / 1.009 (an FP8
# tile holds half the bytes of a bf16 one).
GEMV_PRELOAD_2_MAX_ROWS = {1: 1, 2: 0}


# Whether the one- and two-row GEMV applies RMSNorm's 1 / rms after its sum (_gemv_kernel's
# LATE_RSTD) rather than to the row first, per weight bytes per element. Measured on the
# H100 (7B, captured steps, three alternating rounds, bench/gpu_bench.py order_compare):
# FP8 one row 0.985, two rows 0.985 times as long; bf16 1.067 and 1.110 (its wide tiles and
# the LM head slower), so bf16 keeps the row pass. Logits of 64 decode steps against
# transformers' bf16 forward, FP8 weights: 8.16e-2 and 8.17e-2 relative (row first, after).
GEMV_LATE_RSTD = {1: True, 2: False}


# (weight bytes per element, rows) of the one- and two-row GEMV that read the epilogue's
# inputs after the products, not early (_gemv_kernel's EARLY_EPILOGUE; the tensor-core
# kernel always reads them early). Measured on the H100 (7B, captured steps at 256-token
# contexts, alternating rounds, against reading all of them after the products): FP8 one
# row 0.984 and 0.987 times as long, two rows 1.022 and 1.025, four rows 0.986, 32 rows
# 0.992; bf16 one row 0.995, two rows 0.989, 32 rows 1.000. Engine, batch 1 (128
# in, 256 out): FP8 365.6 -> 371.5 tok/s, bf16 210.1 -> 211.1 (docs/benchmarks.md).
GEMV_LATE_EPILOGUE = {(1, 2)}


def rows_bucket(rows: int) -> int:
    return max(16, _next_pow2(rows))


# One-row tiles for wide weights (N >= 2K: q|k|v, gate|up, the LM head), where GEMV_CONFIG's
# serves the square and tall ones (o, down). Timed shape by shape in whole 7B steps
# (bench/gpu_bench.py tune_shapes, two H100 runs), per-shape tiles made the step 0.991 and
# 0.991 (bf16), 0.994 and 0.990 (FP8) times as long as one tile for all; these two are
# what they chose for the wide weights.
GEMV_WIDE_CONFIG = {(2, 1): ("fma", 2, 2048, 4, 4), (1, 1): ("fma", 8, 512, 4, 4)}
# Exact-shape overrides, keyed (bytes per element, rows bucket, N, K): empty in the code;
# bench/gpu_bench.py's tune_shapes fills it to time tiles shape by shape.
GEMV_SHAPE_CONFIG: dict[tuple[int, int, int, int], tuple] = {}


def config_key(rows: int, fp8: bool) -> tuple[int, int]:
    """GEMV_CONFIG's key: one row, 2 to FUSE_MAX_ROWS rows, or the rows' bucket."""
    bucket = 1 if rows == 1 else FUSE_MAX_ROWS if rows <= FUSE_MAX_ROWS else rows_bucket(rows)
    return (1 if fp8 else 2, bucket)


def gemv_config(rows: int, n: int, k: int, fp8: bool) -> tuple:
    """The tile config of a projection of `rows` rows with an [n, k] weight."""
    key = config_key(rows, fp8)
    return (GEMV_SHAPE_CONFIG.get(key + (n, k)) or (n >= 2 * k and GEMV_WIDE_CONFIG.get(key))
            or GEMV_CONFIG[key])


def gemv(x: torch.Tensor, w: torch.Tensor, *, scale: torch.Tensor | None = None, norm: torch.Tensor | None = None,
         eps: float = 1e-6, act: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """y = f(x) @ w.T (+ bias) (+ residual) for a few rows x [M <= SKINNY_MAX_ROWS, K or 2K].

    w: [N, K] in the activation dtype, or float8_e4m3fn with `scale` [N] float32 per row.
    norm: RMSNorm weight applied to x first; act: x is [gate | up] and f is SiLU(gate) * up.
    residual: added after rounding (out may be the residual itself)."""
    M = x.shape[0]
    N, K = w.shape
    assert x.stride(-1) == 1 and w.is_contiguous() and M <= SKINNY_MAX_ROWS
    if M > FUSE_MAX_ROWS:  # prologues are fused for a few rows only
        if norm is not None:
            x, norm = rms_norm(x, norm, eps), None
        if act:
            x, act = silu_mul(x), False
    fp8 = w.dtype == torch.float8_e4m3fn
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    config = config or gemv_config(M, N, K, fp8)
    kind, block_n, block_k, warps = config[:4]
    block_k = min(block_k, max(16, _next_pow2(K)))
    dummy = out
    args = (x, w, out, residual if residual is not None else dummy, norm if norm is not None else dummy,
            bias if bias is not None else dummy, scale if scale is not None else dummy,
            M, N, x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0, eps)
    flags = dict(NORM=norm is not None, ACT=act, RES=residual is not None, BIAS=bias is not None, FP8=fp8,
                 **_pdl_launch(M))
    grid = (triton.cdiv(N, block_n),)
    if kind == "fma" and M <= FUSE_MAX_ROWS:
        stages = config[4] if len(config) > 4 else 1
        preload = 2 if M <= GEMV_PRELOAD_2_MAX_ROWS.get(w.element_size(), 0) and K > block_k else 1
        _gemv_kernel[grid](*args, K=K, M_PAD=_next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k, **flags,
                           K_POW2=_next_pow2(K), STAGES=stages, PRELOAD=preload,
                           LATE_RSTD=GEMV_LATE_RSTD.get(w.element_size(), False),
                           EARLY_EPILOGUE=(w.element_size(), M) not in GEMV_LATE_EPILOGUE, num_warps=warps)
    else:
        f32 = INTERPRET or x.dtype == torch.float32
        stages = config[4] if kind == "dot" else 3
        _skinny_kernel[grid](*args, K=K, M_PAD=rows_bucket(M), BLOCK_N=max(16, block_n), BLOCK_K=block_k,
                             STAGES=stages, **flags, F32_DOT=f32, K_POW2=_next_pow2(K), NORM_ROWS=FUSE_MAX_ROWS,
                             num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------
# RMSNorm, SiLU * up
# ---------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, eps, K: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    _await_inputs(PDL)
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    mask = k < K
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
    w = tl.load(w_ptr + k, mask=mask, other=0.0).to(tl.float32)
    y = ((x * rstd).to(dt).to(tl.float32) * w).to(dt)
    tl.store(out_ptr + row * stride_out + k, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, K = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows:
        block = _next_pow2(K)
        _rms_norm_kernel[(rows,)](x, weight, out, x.stride(0), out.stride(0), eps, K=K, BLOCK=block,
                                  num_warps=8 if block >= 4096 else 4, **_pdl_launch(rows))
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, K: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    _await_inputs(PDL)
    row = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    dt = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + K + k, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + k, (s * u).to(dt), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2K] = [gate | up] -> SiLU(gate) * up [rows, K]."""
    rows, K2 = x.shape
    K = K2 // 2
    out = torch.empty(rows, K, dtype=x.dtype, device=x.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(K, block))](x, out, x.stride(0), out.stride(0), K=K, BLOCK=block,
                                                        **_pdl_launch(rows))
    return out


# ---------------------------------------------------------------------------------------
# FP8 activations for torch._scaled_mm
# ---------------------------------------------------------------------------------------


# The activation quantization divides by the row's scale through a reciprocal and an FMA
# correction instead of div_rn per element: the same e4m3 values (bytes too, but for the
# sign of zero), and the SiLU * up quantization of the Llama-3-8B down projection took
# 0.81 to 0.82 times as long on the H100 at 512 and 8192 rows (bench/gpu_bench.py --kernels).
QUANT_FMA_DIVISION = True


@triton.jit
def _quantize_rows_kernel(x_ptr, add_ptr, nw_ptr, q_ptr, scale_ptr, M, stride_x, stride_add, eps, min_scale,
                          fp8_max, inv_fp8_max, K: tl.constexpr, BLOCK: tl.constexpr, ACT: tl.constexpr,
                          NORM: tl.constexpr, ADD: tl.constexpr, FMA_DIV: tl.constexpr, PDL: tl.constexpr):
    _await_inputs(PDL)
    # One program per row: the projection's prologue (RMSNorm, or SiLU(gate) * up), absmax,
    # scale, quantize, in one read of the row; the prologue's output never goes to memory.
    # ADD (with NORM): x += add first, rounded as torch's in-place add, and stored: the
    # residual add of the previous projection done in the same pass.
    # Rows past M (padding for _scaled_mm's multiple of 16) become zeros with scale 1.
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    k_mask = k < K
    x_mask = (k_mask & (row < M))[None, :]
    x_row = _one_row(x_ptr, row, stride_x)
    rstd = tl.zeros([1], dtype=tl.float32)
    if ADD:
        dt = x_ptr.dtype.element_ty
        a_row = _one_row(add_ptr, row, stride_add)
        xs = (tl.load(x_row + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
              + tl.load(a_row + k[None, :], mask=x_mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(x_row + k[None, :], xs, mask=x_mask)
        xf = xs.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / K + eps)
        x = _norm_tile(xs, nw_ptr, k, k_mask, rstd, dt).to(tl.float32)
    else:
        if NORM:
            xf = tl.load(x_row + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / K + eps)
        x = _input_tile(x_row, nw_ptr, x_ptr, k, k_mask, x_mask, rstd, K, ACT, NORM).to(tl.float32)
    # As torch computes amax / 448: times the float32 reciprocal (its division by a scalar).
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), min_scale) * inv_fp8_max  # [1]
    scale = tl.where(row < M, scale, 1.0)
    # Correctly rounded division, as torch's x / scale (Triton's default one is approximate).
    if FMA_DIV:  # one correctly rounded reciprocal a row, then per element a product and its
        # FMA correction, which is the correctly rounded quotient (Markstein's theorem: the
        # reciprocal within half an ulp, the first quotient within one) at a fraction of
        # div_rn's instructions. One difference: x = -0 gives +0 (the correction's sum of
        # zeros), which no product or sum can tell from -0. Keeping the sign (a select on
        # x == 0) cost most of the time saved in the SiLU * up kernel on the H100.
        r = tl.math.div_rn(tl.full([1], 1.0, tl.float32), scale)[:, None]
        q0 = x * r
        quotient = tl.fma(tl.fma(-q0, scale[:, None], x), r, q0)
    else:
        quotient = tl.math.div_rn(x, scale[:, None])
    q = tl.clamp(quotient, -fp8_max, fp8_max)
    q = tl.where(row < M, q, 0.0)  # padding: +0, not the -0 a negative norm weight would leave
    tl.store(q_ptr + row * K + k[None, :], q.to(q_ptr.dtype.element_ty), mask=k_mask[None, :])
    tl.store(scale_ptr + row + tl.zeros([1], dtype=tl.int64), scale)


def quantize_rows_fp8(x: torch.Tensor, rows: int, min_scale: float, fp8_max: float, *,
                      norm: torch.Tensor | None = None, eps: float = 0.0, act: bool = False,
                      add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) [M, K] -> (q [rows, K] float8_e4m3fn, scale [rows, 1] float32), rows >= M: per-row
    absmax scaling, f(x)[m] ~= q[m] * scale[m]; rows past M are zero. f is the identity,
    RMSNorm times `norm` (rounded as rms_norm rounds), or with `act` SiLU(gate) * up of
    x = [gate | up] (as silu_mul): the same bits as those kernels followed by this one.
    add (with norm): x += add in place first (x.add_(add)'s bits), then as above."""
    M, K = x.shape
    if act:
        K //= 2
    assert add is None or (norm is not None and not act and add.shape == x.shape and add.stride(-1) == 1)
    q = torch.empty(rows, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = _next_pow2(K)
    _quantize_rows_kernel[(rows,)](x, add if add is not None else x, norm if norm is not None else x, q, scale, M,
                                   x.stride(0), add.stride(0) if add is not None else 0, eps, min_scale, fp8_max,
                                   1.0 / fp8_max, K=K, BLOCK=block, ACT=act, NORM=norm is not None,
                                   ADD=add is not None, FMA_DIV=QUANT_FMA_DIVISION,
                                   num_warps=16 if block >= 16384 else 8 if block >= 4096 else 4,
                                   **_pdl_launch(rows))
    return q, scale


# ---------------------------------------------------------------------------------------
# Rotary embedding + KV cache write
# ---------------------------------------------------------------------------------------


@triton.jit
def _to_cache(x, cache_ptr, FP8_CACHE: tl.constexpr):
    """A K or V value as the cache stores it: e4m3 saturates at +-448 rather than overflowing."""
    if FP8_CACHE:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
    return x.to(cache_ptr.dtype.element_ty)


# Kernels that call _rotate_pairs launch with enable_fp_fusion=False: with Triton's default
# contraction the compiler fused `a cos` into the sum (one bf16 FMA, PTX fma.rn.bf16),
# skipping the product's rounding; a few percent of the rotated values then differed from
# torch's by one rounding, and from each other between two kernels compiled differently.
@triton.jit
def _rope_factors(table_ptr, pos, num_positions, d, HALF: tl.constexpr):
    """cos and sin [1, D] (float32) of position pos for the columns d, from the rope table."""
    cos = tl.load(table_ptr + pos * HALF + d // 2).to(tl.float32)[None, :]
    sin = tl.load(table_ptr + num_positions * HALF + pos * HALF + d // 2).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotate_pairs(x, partner, cos, sin, d, dt: tl.constexpr):
    """Rope of rows x [R, D] (partner: each element's pair partner 2i <-> 2i + 1, float32;
    cos, sin: _rope_factors'): a' = a cos - b sin at 2i, b' = b cos + a sin at 2i + 1, each
    product and the sum rounded to dt as torch rounds them (negating a rounded product is
    exact)."""
    sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
    xc = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    ps = (partner * sin).to(dt).to(tl.float32)
    return (xc + sign * ps).to(dt)


@triton.jit
def _rope_cache_kernel(qkv_ptr, pos_ptr, slot_ptr, table_ptr, cache_ptr, stride_qkv, num_positions,
                       H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr,
                       FP8_CACHE: tl.constexpr, PDL: tl.constexpr):
    # One program per (token, group of HEADS heads) over a [HEADS, D] tile: q and k heads
    # rotate (k also goes to the cache), v heads only go to the cache. Every load and store
    # is of whole contiguous head rows; each element's rope partner (2i <-> 2i + 1) comes
    # from a second load of the same cache lines. (Loading the partners as two stride-2
    # halves moved 0.45 TB/s: 8.5 ms of an 8192-token Llama-3-8B prefill step.)
    _await_inputs(PDL)
    t = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    dt = qkv_ptr.dtype.element_ty
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    d = tl.arange(0, D)
    valid = (h < H + 2 * KVH)[:, None]
    turn = (h < H + KVH)[:, None]  # q and k heads; v heads keep their values
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    row = qkv_ptr + t * stride_qkv + h[:, None] * D
    x = tl.load(row + d[None, :], mask=valid, other=0.0)
    partner = tl.load(row + (d ^ 1)[None, :], mask=valid & turn, other=0.0).to(tl.float32)
    cos, sin = _rope_factors(table_ptr, pos, num_positions, d, HALF)
    y = tl.where(turn, _rotate_pairs(x, partner, cos, sin, d, dt), x)
    tl.store(row + d[None, :], y, mask=valid & turn)
    # The cache row of a token is [k heads | v heads] x D: the heads past q, in order.
    to = cache_ptr + slot * (2 * KVH * D) + (h[:, None] - H) * D + d[None, :]
    tl.store(to, _to_cache(y, cache_ptr, FP8_CACHE), mask=valid & (h >= H)[:, None] & (slot >= 0))


# Heads per rope program: 8 heads x 128 = 1024 elements, 16 per thread of two warps.
ROPE_HEADS = 8


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor,
                   cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> None:
    """qkv [T, (heads + 2 kv_heads) * head_dim]: rotate q and k in place (interleaved
    rope layout), then write k and v of token t into cache slot slots[t] (skipped when < 0).

    table: [2, P, head_dim / 2] cos | sin in the model dtype. cache: one layer's
    [blocks, block_size, 2 * kv_heads, head_dim], keys first, in the model dtype or FP8."""
    T = qkv.shape[0]
    if T == 0:
        return
    grid = (T, triton.cdiv(heads + 2 * kv_heads, ROPE_HEADS))
    _rope_cache_kernel[grid](qkv, positions, slots, table, cache, qkv.stride(0), table.shape[1], H=heads,
                             KVH=kv_heads, D=head_dim, HEADS=ROPE_HEADS, FP8_CACHE=cache.dtype.itemsize == 1,
                             num_warps=2, enable_fp_fusion=False, **_pdl_launch(T))


# ---------------------------------------------------------------------------------------
# Paged decode attention
# ---------------------------------------------------------------------------------------


# The split count is a run-time argument (not specialised): in mixed prefill + decode
# steps it follows the longest context, and one compilation per value stalled serving
# for up to seconds whenever a new context range came up.
@triton.jit
def _split_tiles(ctx_ptr, seq, split, window, num_splits, TILE: tl.constexpr):
    """Sequence seq's context length, first visible token, the [t_begin, t_end) tiles of
    context split `split`, and how many splits hold tiles (at least 1: an empty context's
    split 0 writes the zeros of a padding row)."""
    # A [1] block summed to a scalar: the interpreter (CPU tests) turns scalar loads into [1] arrays.
    ctx = tl.sum(tl.load(ctx_ptr + seq + tl.arange(0, 1)).to(tl.int32), axis=0)
    first = 0
    if window > 0:
        first = tl.maximum(ctx - window, 0)
    first_tile = first // TILE
    num_tiles = tl.cdiv(ctx, TILE) - first_tile
    per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    active = tl.maximum(tl.cdiv(num_tiles, per_split), 1)
    t_begin = first_tile + split * per_split
    t_end = tl.minimum(t_begin + per_split, first_tile + num_tiles)
    return ctx, first, t_begin, t_end, active


@triton.jit
def _kv_tile(cache_ptr, table_row, tile, first, end, kvh, d, stride_block, dt: tl.constexpr, KVH: tl.constexpr,
             D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Keys and values [TILE, D] (widened to dt) of context tile `tile` for KV head kvh, and
    which of its tokens are in [first, end) (the others read as zeros)."""
    tok = tile * TILE + tl.arange(0, TILE)
    valid = (tok < end) & (tok >= first)
    block = tl.load(table_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    base = cache_ptr + block * stride_block + (tok % BLOCK_SIZE) * (2 * KVH * D) + kvh * D
    k = tl.load(base[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(dt)
    v = tl.load(base[:, None] + KVH * D + d[None, :], mask=valid[:, None], other=0.0).to(dt)
    return k, v, valid


@triton.jit
def _rescale(m_i, row_max):
    """The online softmax's new running max, the max its exponents are taken against (0 while
    no key is visible, so that nothing becomes NaN), and the old sums' factor."""
    m_new = tl.maximum(m_i, row_max)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_ref, tl.exp2(m_i - m_ref)


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, dt: tl.constexpr, F32_DOT: tl.constexpr):
    """One step of the online softmax: the running max m_i, sum l_i and output acc of the
    query heads q after the visible (`valid`) keys k and values v of one tile."""
    if F32_DOT:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new, m_ref, alpha = _rescale(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if F32_DOT:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(dt), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend_token(q, k, v, take, m_i, l_i, acc, qk_scale, dt: tl.constexpr, F32_DOT: tl.constexpr):
    """_attend_tile for one key k and value v [1, D] (in the cache dtype), where `take`: its
    score on the FMA units, its probability rounded as the tile's are for their dot."""
    kf = k.to(dt).to(tl.float32)
    s = tl.sum(q.to(tl.float32) * kf, axis=1) * qk_scale
    s = tl.where(take, s, float("-inf"))
    m_new, m_ref, alpha = _rescale(m_i, s)
    p = tl.exp2(s - m_ref)
    l_i = l_i * alpha + p
    if not F32_DOT:
        p = p.to(dt).to(tl.float32)
    return m_new, l_i, acc * alpha[:, None] + p[:, None] * v.to(dt).to(tl.float32)


# Not specialized on the block table's width (stride_table), which follows the step's
# longest context in eager steps: each new value's divisibility by 16 was a compilation
# while serving (see fill_decode_inputs).
@triton.jit(do_not_specialize=["num_splits", "stride_table"])
def _paged_decode_kernel(q_ptr, cache_ptr, tables_ptr, ctx_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
                         pos_ptr, slot_ptr, rope_ptr, num_positions,
                         stride_q, stride_out, stride_table, stride_block, qk_scale, window, num_splits,
                         KVH: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr,
                         F32_DOT: tl.constexpr, F16_DOT: tl.constexpr, ROPE: tl.constexpr,
                         EARLY_KV: tl.constexpr, FP8_CACHE: tl.constexpr, PDL: tl.constexpr):
    # ROPE: q_ptr is the whole qkv row, not yet rotated, and the sequence's new K/V is not
    # yet in the cache: each program rotates its query heads itself, and the program whose
    # tiles hold the new token (the last) rotates its key head and writes it and the value
    # into the cache. This is rope_and_cache's work for decode rows, in this kernel's launch
    # instead of one of its own per layer.
    # EARLY_KV: the new token (the context's last) is attended to on its own, after the
    # tiles, and the first tile (every token but the new one) is read before the wait: the
    # cache held it before this step, so its loads overlap the kernel before instead of
    # following it. Without it, a ROPE program writes the new K/V and reads it back with
    # its tile (a CTA barrier orders the two).
    # Splits past the context's last tile (the graph's split count follows max_model_len)
    # end at once, before the wait and without writing anything; the combine kernel reads
    # only the splits that hold tiles. (A 7B batch-1 graph step at 256-token contexts,
    # 4 of whose 9 splits a head hold a tile, took 29 us less with the split count capped
    # at 4: docs/benchmarks.md.) The context lengths and block tables were written before
    # the previous kernel started, so reading them before the wait is safe.
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx, first, t_begin, t_end, active = _split_tiles(ctx_ptr, seq, split, window, num_splits, TILE)
    if split < active:
        H: tl.constexpr = KVH * GROUP
        HALF: tl.constexpr = D // 2
        model_dt = q_ptr.dtype.element_ty
        dt = model_dt  # the dots' dtype; an FP8 cache is widened to it
        if F16_DOT:
            dt = tl.float16
        g = tl.arange(0, GROUP_PAD)
        g_mask = g < GROUP
        d = tl.arange(0, D)
        table_row = tables_ptr + seq * stride_table
        last_tile = (ctx - 1) // TILE  # the new token's
        owner = (ctx > 0) & (last_tile >= t_begin) & (last_tile < t_end)
        if EARLY_KV:
            k0, v0, valid0 = _kv_tile(cache_ptr, table_row, t_begin, first, ctx - 1, kvh, d, stride_block, dt, KVH,
                                      D, BLOCK_SIZE, TILE)
        if ROPE:  # positions are written before the step, like the context lengths
            pos = tl.sum(tl.load(pos_ptr + seq + tl.arange(0, 1)), axis=0)
            cos, sin = _rope_factors(rope_ptr, pos, num_positions, d, HALF)
        _await_inputs(PDL)
        heads = kvh * GROUP + g
        q_row = q_ptr + seq * stride_q
        q = tl.load(q_row + heads[:, None] * D + d[None, :], mask=g_mask[:, None], other=0.0)
        if ROPE:
            partner = tl.load(q_row + heads[:, None] * D + (d ^ 1)[None, :], mask=g_mask[:, None], other=0.0)
            q = _rotate_pairs(q, partner.to(tl.float32), cos, sin, d, model_dt)
            k_row = q_row + (H + kvh) * D
            k_new = tl.load(k_row + d[None, :])
            k_new = _rotate_pairs(k_new, tl.load(k_row + (d ^ 1)[None, :]).to(tl.float32), cos, sin, d, model_dt)
            k_new = _to_cache(k_new, cache_ptr, FP8_CACHE)  # [1, D], as the cache will hold it
            v_new = _to_cache(tl.load(q_row + (H + KVH + kvh) * D + d[None, :]), cache_ptr, FP8_CACHE)
            slot = tl.sum(tl.load(slot_ptr + seq + tl.arange(0, 1)), axis=0).to(tl.int64)
            to = cache_ptr + slot * (2 * KVH * D) + kvh * D + d[None, :]
            store = (d[None, :] < D) & owner & (slot >= 0)
            tl.store(to, k_new, mask=store)
            tl.store(to + KVH * D, v_new, mask=store)
            if not EARLY_KV:
                tl.debug_barrier()  # the stores above are visible to every thread of the program below
        elif EARLY_KV:  # the new K/V, written by rope_and_cache (the kernel before)
            new_block = tl.load(table_row + (ctx - 1) // BLOCK_SIZE + tl.zeros([1], dtype=tl.int32), mask=owner,
                                other=0).to(tl.int64)
            at = cache_ptr + new_block[:, None] * stride_block + ((ctx - 1) % BLOCK_SIZE) * (2 * KVH * D) + kvh * D
            k_new = tl.load(at + d[None, :], mask=(d[None, :] < D) & owner, other=0.0)
            v_new = tl.load(at + KVH * D + d[None, :], mask=(d[None, :] < D) & owner, other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
        if F16_DOT:
            q = q.to(tl.float16)
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
        end = ctx
        loop_begin = t_begin
        if EARLY_KV:
            end = ctx - 1
            loop_begin = t_begin + 1
            m_i, l_i, acc = _attend_tile(q, k0, v0, valid0, m_i, l_i, acc, qk_scale, dt, F32_DOT)
        for tile in range(loop_begin, t_end):
            k, v, valid = _kv_tile(cache_ptr, table_row, tile, first, end, kvh, d, stride_block, dt, KVH, D,
                                   BLOCK_SIZE, TILE)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, dt, F32_DOT)
        if EARLY_KV:
            m_i, l_i, acc = _attend_token(q, k_new, v_new, owner, m_i, l_i, acc, qk_scale, dt, F32_DOT)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        if not SPLIT:
            tl.store(out_ptr + seq * stride_out + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=g_mask[:, None])
        else:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            idx = (seq * H + heads) * num_splits + split
            tl.store(mid_o_ptr + idx[:, None] * D + d[None, :], o, mask=g_mask[:, None])
            tl.store(mid_lse_ptr + idx, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, ctx_ptr, stride_out, window, num_splits, H: tl.constexpr,
                    D: tl.constexpr, TILE: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    _await_inputs(PDL)
    seq = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    base = (seq * H + h) * num_splits
    active = _split_tiles(ctx_ptr, seq, 0, window, num_splits, TILE)[4]  # the splits that wrote
    lse = tl.load(mid_lse_ptr + base + s, mask=s < active, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    o = tl.load(mid_o_ptr + (base + s)[:, None] * D + d[None, :], mask=(s < active)[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    total = tl.where(total > 0, total, 1.0)
    res = tl.sum(w[:, None] * o, axis=0) / total
    tl.store(out_ptr + seq * stride_out + h * D + d, res.to(out_ptr.dtype.element_ty))


LOG2E = 1.4426950408889634
ATTN_TILE = 64
MAX_SPLITS = 16
# (tokens per tile, warps, stages) of the decode attention for a bf16 / fp16 and an FP8
# cache (bench/gpu_bench.py's kernel_sweep times others).
ATTN_CONFIG = {"model": (ATTN_TILE, 4, 3), "fp8": (64, 2, 2)}


# Batches of up to this many rows read their first K/V tile before the wait for the kernel
# before (paged_decode_attention's early_kv; only PDL launches wait, see PDL_MAX_ROWS).
# Measured on the H100 (7B, captured steps at 256-token contexts, three alternating
# rounds): one row 0.992 times as long in bf16 and 0.975 in FP8, two rows 0.996 and 0.994;
# the attention's share of a one-row layer from 7.6 to 5.3 us.
EARLY_KV_MAX_ROWS = 2


def decode_splits(batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Context splits so that batch * kv_heads * splits programs fill the GPU about twice,
    never more than the context has tiles."""
    programs = batch * kv_heads
    want = -(-2 * num_sms // programs)
    return max(1, min(MAX_SPLITS, want, -(-max_context // ATTN_TILE)))


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor,
                           heads: int, kv_heads: int, head_dim: int, scale: float, splits: int = 1,
                           window: int | None = None, out: torch.Tensor | None = None,
                           rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           early_kv: bool | None = None) -> torch.Tensor:
    """q: [B, >= heads * head_dim] (row stride free, e.g. the q part of the fused qkv);
    cache: one layer [blocks, block_size, 2 * kv_heads, head_dim]; tables [B, max_blocks];
    context_lens [B] (0: the row is padding and gets zeros). Returns [B, heads * head_dim].
    The cache may be FP8 (e4m3) under a bf16 or fp16 q: keys and values are widened as read.

    rope (positions [B], slots [B], table as rope_and_cache's): q is the whole qkv row before
    rope_and_cache, which this call then does too (qkv itself is left as it was): the same
    attention output and cache contents as rope_and_cache followed by this call without it.

    early_kv (None: for batches of up to EARLY_KV_MAX_ROWS rows): each row's newest token
    (the context's last, whose K/V this step wrote) is attended to apart from the others,
    whose first tile is read before the wait for the kernel before (see the kernel). The
    sums then meet in another order: not bit-identical to early_kv=False."""
    B = q.shape[0]
    if out is None:
        out = torch.empty(B, heads * head_dim, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = heads // kv_heads
    block_size = cache.shape[1]
    f32 = INTERPRET or cache.dtype == torch.float32
    # An FP8 cache: e4m3 widens to fp16 in one instruction (to bf16 it takes several), so
    # the dots run in fp16 (q too: post-rope queries are far inside fp16's range), over
    # 64-token tiles by 2 warps, 2 stages. Measured on the H100 (512 rows x 256 tokens,
    # 8 KV heads): 117 us against 190 for the bf16 cache with 128-token tiles; with the
    # bf16 cache's own tile (64 tokens, 4 warps, bf16 dots) the FP8 cache was barely faster
    # (188 us). At contexts of 128 to 256 tokens (the 8B offline run's) 64-token tiles took
    # 94.9 us against 105.0 for 128 (bench/gpu_bench.py --kernels).
    fp8 = not f32 and cache.dtype.itemsize == 1
    tile, warps, stages = ATTN_CONFIG["fp8" if fp8 else "model"]
    if splits > 1:
        mid_o = torch.empty(B * heads * splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B * heads * splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out
    positions, slots, table = rope if rope is not None else (context_lens, context_lens, q)
    _paged_decode_kernel[(B, kv_heads, splits)](
        q, cache, tables, context_lens, out, mid_o, mid_lse, positions, slots, table,
        table.shape[1] if rope is not None else 0,
        q.stride(0), out.stride(0), tables.stride(0), cache.stride(0), scale * LOG2E, window or 0, splits,
        KVH=kv_heads, GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), D=head_dim, BLOCK_SIZE=block_size,
        TILE=tile, SPLIT=splits > 1, F32_DOT=f32, F16_DOT=fp8, ROPE=rope is not None,
        EARLY_KV=B <= EARLY_KV_MAX_ROWS if early_kv is None else early_kv, FP8_CACHE=cache.dtype.itemsize == 1, num_warps=warps, num_stages=stages, enable_fp_fusion=False,
        **_pdl_launch(B),
    )
    if splits > 1:
        _combine_kernel[(B, heads)](mid_o, mid_lse, out, context_lens, out.stride(0), window or 0, splits, H=heads,
                                    D=head_dim, TILE=tile, SPLITS_PAD=_next_pow2(MAX_SPLITS), **_pdl_launch(B))
    return out


# ---------------------------------------------------------------------------------------
# Greedy choice with the chosen token's logprob
# ---------------------------------------------------------------------------------------


# Not specialized on stride_ban: 0 (one list for every row) and a row's width are both
# used, and each would be a compilation of its own while serving.
@triton.jit(do_not_specialize=["stride_ban"])
def _greedy_kernel(logits_ptr, token_ptr, packed_ptr, ban_ptr, stride, stride_ban, V: tl.constexpr,
                   BLOCK: tl.constexpr, BANS: tl.constexpr):
    # One program per row, one pass over it: each lane keeps its first maximum and its
    # index, and a running log-sum-exp (its largest logit m and the sum of exp(x - m) over
    # what it has read, rescaled when m grows: one exp a logit). Written: the token (int64,
    # for the next step's input on the device) and [token, logprob] as float64 (the
    # sampler's read-back row).
    # BANS > 0: the row's BANS ids at ban_ptr (-1: none) cannot be chosen, as if their
    # logits were -inf (min_new_tokens' processor), while the logprob stays that of the
    # raw logits (the log-sum-exp runs over every logit).
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    index = tl.zeros([BLOCK], dtype=tl.int32)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if BANS > 0:
        bans = tl.load(ban_ptr + row.to(tl.int64) * stride_ban + tl.arange(0, BANS)).to(tl.int32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        # exp(-|x - m|) is the new logit's term (x <= m) or the old sum's rescaling (x > m);
        # a -inf logit adds nothing (and -inf - -inf would be NaN).
        e = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - m)))
        total = tl.where(x > m, total * e + 1.0, total + e)
        m = tl.maximum(m, x)
        if BANS > 0:
            banned = tl.sum(((start + cols)[:, None] == bans[None, :]).to(tl.int32), axis=1) > 0
            x = tl.where(banned, float("-inf"), x)
        better = x > best  # strictly: each lane keeps its first maximum
        best = tl.where(better, x, best)
        index = tl.where(better, start + cols, index)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, index, V), axis=0)  # the first maximum, as torch.argmax
    ref = tl.max(m, axis=0)
    lanes = tl.where(m == float("-inf"), 0.0, total * tl.exp(m - ref))
    chosen = tl.load(base + token).to(tl.float32)
    logprob = chosen - (ref + tl.log(tl.sum(lanes, axis=0)))  # float32, widened below as torch would
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(packed_ptr + 2 * row, token.to(tl.float64))
    tl.store(packed_ptr + 2 * row + 1, logprob.to(tl.float64))


# Banned ids a row (min_new_tokens' stop ids) are padded to a multiple of this: one compiled
# variant for the usual few (a model's eos ids and a request's stop_token_ids).
GREEDY_BANS = 8
# (logits a tile, warps) of the greedy kernel, for more rows and for up to GREEDY_FEW_ROWS
# rows, where the row's latency is the step's: wider tiles over more warps, fewer turns of
# the loop. Measured on the H100 (one row, in a graph): 32,000 bf16 logits 7.48 us with
# the two-pass kernel and 2,048 x 8 warps, 6.39 with one pass and 8,192 x 32 (4,096 x 16:
# 6.25); 128,256 logits 30.18 and 15.26 us (docs/benchmarks.md).
GREEDY_FEW_ROWS = 8
GREEDY_TILES = {False: (2048, 8), True: (8192, 32)}


def greedy_with_logprob(logits: torch.Tensor, bans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, vocab] -> (argmax [rows] int64, [argmax, log_softmax at it] [rows, 2]
    float64; the logprob computed in float32), without the [rows, vocab] log-softmax that
    torch would write to gather one value a row (525 MB a step at 1,024 rows of a 128k
    vocabulary), and with the sampler's read-back rows written directly (three kernels
    fewer a step than converting and concatenating them). Ties go to the first index, as
    torch.argmax; NaN logits are not supported.

    bans: int64 [rows, B] or [B] (the same for every row), B a multiple of GREEDY_BANS:
    ids the argmax skips (-1 pads), as min_new_tokens masks a row's stop ids to -inf; the
    logprob is still the raw logits' log-softmax, as the sampler reports it."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    packed = torch.empty(rows, 2, dtype=torch.float64, device=logits.device)
    width, stride_ban = 0, 0
    if bans is not None:
        width = bans.shape[-1]
        assert width % GREEDY_BANS == 0 and bans.stride(-1) == 1 and bans.dtype == torch.int64
        stride_ban = bans.stride(0) if bans.dim() == 2 else 0
    if rows:
        block, warps = GREEDY_TILES[rows <= GREEDY_FEW_ROWS]
        _greedy_kernel[(rows,)](logits, tokens, packed, bans if bans is not None else tokens, logits.stride(0),
                                stride_ban, V=vocab, BLOCK=block, BANS=width, num_warps=warps)
    return tokens, packed


# ---------------------------------------------------------------------------------------
# A decode step's inputs into the CUDA graph's static buffers
# ---------------------------------------------------------------------------------------


# The step's inputs are views into one packed host-to-device copy (build_forward_batch),
# so their addresses' 16-byte alignment and the table's width and stride change from step
# to step; Triton specializes a kernel on each, and each new combination was a compilation
# in the middle of decoding (66 and 52 ms steps of a 7B batch-1 run, where the table grew
# to 10 and to 16 blocks). Not specialized on them: one compiled variant.
@triton.jit(do_not_specialize=["ids_ptr", "pos_ptr", "slots_ptr", "ctx_ptr", "tables_ptr", "stride_table", "width",
                               "feed_tokens_ptr", "feed_to_ptr", "feed_from_ptr", "num_feed"])
def _decode_inputs_kernel(ids_ptr, pos_ptr, slots_ptr, ctx_ptr, tables_ptr, stride_table, width,
                          s_ids_ptr, s_pos_ptr, s_slots_ptr, s_ctx_ptr, s_tables_ptr, stride_s_table,
                          feed_tokens_ptr, feed_to_ptr, feed_from_ptr, num_feed,
                          BLOCK: tl.constexpr, FEED_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    one = tl.arange(0, 1)  # [1] blocks: the interpreter (CPU tests) wants no scalar loads
    token = tl.load(ids_ptr + row + one).to(tl.int64)
    # A token still in flight (the row is in feed_to): the launched step's sample instead.
    f = tl.arange(0, FEED_BLOCK)
    to = tl.load(feed_to_ptr + f, mask=f < num_feed, other=-1)
    from_row = tl.load(feed_from_ptr + f, mask=f < num_feed, other=0)
    picked = tl.sum(tl.where(to == row, from_row + 1, 0), axis=0) - 1 + tl.zeros([1], dtype=tl.int64)  # -1: none
    fed = picked >= 0
    token = tl.where(fed, tl.load(feed_tokens_ptr + tl.maximum(picked, 0), mask=fed, other=0), token)
    tl.store(s_ids_ptr + row + one, token)
    tl.store(s_pos_ptr + row + one, tl.load(pos_ptr + row + one).to(tl.int64))
    tl.store(s_slots_ptr + row + one, tl.load(slots_ptr + row + one).to(tl.int64))
    tl.store(s_ctx_ptr + row + one, tl.load(ctx_ptr + row + one).to(tl.int64))
    cols = tl.arange(0, BLOCK)  # BLOCK >= width: one tile (no loop with a run-time bound)
    mask = cols < width
    src = tables_ptr + row.to(tl.int64) * stride_table
    dst = s_tables_ptr + row.to(tl.int64) * stride_s_table
    tl.store(dst + cols, tl.load(src + cols, mask=mask).to(tl.int64), mask=mask)


def fill_decode_inputs(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                       tables: torch.Tensor, static: tuple[torch.Tensor, ...], feed: TokenFeed | None = None) -> None:
    """Rows [0, n) of the static (ids, positions, slots, context_lens, tables) buffers from a
    step's n-row inputs (tables [n, width], width <= the static table's): one launch in
    place of five copies, each a few microseconds of a batch-1 step.

    feed (engine.runtime.base.TokenFeed, its rows all below n): ids[feed.to] are taken from
    feed.tokens[feed.from_] instead, the in-flight tokens' copy in the same launch."""
    n, width = tables.shape
    s_ids, s_pos, s_slots, s_ctx, s_tables = static
    assert width <= s_tables.shape[1] and n <= s_ids.shape[0] and tables.stride(1) == 1
    if n:
        # One tile as wide as the static table: one compiled variant, rather than one per
        # power of two of the step's width (each a Triton compilation in the middle of
        # serving, the first time contexts grow past it). The same for the feed's rows, at
        # most the static table's (decode rows only; the ids buffer also holds prompt rows).
        block = max(16, _next_pow2(s_tables.shape[1]))
        tokens, to, src = (feed.tokens, feed.to, feed.from_) if feed is not None else (ids, ids, ids)
        _decode_inputs_kernel[(n,)](ids, positions, slots, context_lens, tables, tables.stride(0), width,
                                    s_ids, s_pos, s_slots, s_ctx, s_tables, s_tables.stride(0),
                                    tokens, to, src, to.shape[0] if feed is not None else 0,
                                    BLOCK=block, FEED_BLOCK=max(16, _next_pow2(s_tables.shape[0])),
                                    num_warps=4 if block >= 2048 else 1)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


__all__ = ["FUSE_MAX_ROWS", "SKINNY_MAX_ROWS", "decode_splits", "fill_decode_inputs", "gemv", "greedy_with_logprob",
           "num_sms",
           "paged_decode_attention", "rms_norm", "rope_and_cache", "silu_mul"]
