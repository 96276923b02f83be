"""The CUDA runtime (engine/runtime/cuda): Triton kernels, CUDA-graph decode, FP8.

Runs on a CUDA GPU with Triton. Without one every test is skipped, unless Triton is
importable and TRITON_INTERPRET=1 is set: then the kernels run in Triton's CPU
interpreter (slow, tiny shapes; its float32 -> bf16 casts truncate instead of rounding,
so bf16 results are only checked loosely there, float32 ones tightly everywhere).

Tolerances: float32 runs (cuBLAS without TF32, float32 Triton dots) differ from
transformers' float32 forward only in summation order (~1e-6 on these logits), so atol
1e-4 as in test_model_parity; bf16 runs are compared by relative error of the logits
(||ours - theirs|| / ||theirs||), which sits near 5e-3 for bf16 roundings and above 1e-1
for any real error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a CUDA GPU with Triton (or TRITON_INTERPRET=1)")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bf16_tol() -> float:
    return 2e-2 if INTERPRET else 1e-2


# ---- kernels --------------------------------------------------------------------------------


def ref_rms_norm(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("rows,cfg", [(1, ("fma", 8, 64, 4)), (3, ("fma", 16, 64, 4)), (1, ("dot", 32, 64, 4, 3)),
                                      (1, ("fma", 8, 64, 4, 2)), (2, ("fma", 4, 32, 4, 3)),
                                      (4, ("dot", 16, 32, 4, 2)), (20, ("dot", 32, 64, 4, 3))])
def test_gemv_fusions_match_torch(rows, cfg):
    from engine.runtime.cuda.kernels import gemv

    g = torch.Generator(device="cpu").manual_seed(rows)
    N, K = 72, 160
    make = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    x, w, nw, b, res, x2 = make(rows, K), make(N, K) * 0.1, make(K), make(N), make(rows, N), make(rows, 2 * K)
    assert rel(gemv(x, w, config=cfg), F.linear(x, w)) < bf16_tol()
    assert rel(gemv(x, w, norm=nw, eps=1e-5, config=cfg), F.linear(ref_rms_norm(x, nw, 1e-5), w)) < bf16_tol()
    gate, up = x2.chunk(2, dim=-1)
    assert rel(gemv(x2, w, act=True, config=cfg), F.linear(F.silu(gate) * up, w)) < bf16_tol()
    out = res.clone()
    y = gemv(x, w, bias=b, residual=out, out=out, config=cfg)
    assert y.data_ptr() == out.data_ptr()
    assert rel(y, res + F.linear(x, w, b)) < bf16_tol()
    # float32 is exact up to summation order.
    x32, w32 = x.float(), w.float()
    torch.testing.assert_close(gemv(x32, w32, norm=nw.float(), eps=1e-5, config=cfg),
                               F.linear(F.rms_norm(x32, (K,), nw.float(), 1e-5), w32), atol=1e-4, rtol=1e-4)


def test_gemv_fp8_equals_dequantized_weights():
    from engine.runtime.cuda.fp8 import quantize_rows
    from engine.runtime.cuda.kernels import gemv

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 256, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(96, 256, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    q = quantize_rows(w)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (96,)
    assert rel(q.dequantize(torch.float32), w.float()) < 0.04  # e4m3 has 3 mantissa bits
    for cfg in (("fma", 16, 128, 4), ("fma", 8, 64, 4, 3), ("dot", 32, 128, 4, 3)):
        y = gemv(x, q.q, scale=q.scale, config=cfg)
        assert rel(y, F.linear(x.float(), q.dequantize(torch.float32))) < bf16_tol()


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_norm_with_rstd_first_or_after_the_sum(monkeypatch, late, rows):
    """The FMA GEMV's fused RMSNorm either way (kernels.GEMV_LATE_RSTD): 1 / rms applied to the
    row first, rounded as torch rounds, or factored out and applied to the sum; both within
    bf16's tolerance of torch, for bf16 and FP8 weights."""
    from engine.runtime.cuda import kernels
    from engine.runtime.cuda.fp8 import quantize_rows

    monkeypatch.setattr(kernels, "GEMV_LATE_RSTD", {1: late, 2: late})
    g = torch.Generator(device="cpu").manual_seed(rows + 2 * late)
    N, K = 72, 320
    x = (torch.randn(rows, K, generator=g) * 4).to(DEVICE, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    nw = (torch.rand(K, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    normed = ref_rms_norm(x, nw, 1e-5)
    for cfg in (("fma", 8, 64, 4), ("fma", 4, 128, 4, 3)):
        assert rel(kernels.gemv(x, w, norm=nw, eps=1e-5, config=cfg), F.linear(normed, w)) < bf16_tol()
        q = quantize_rows(w)
        y = kernels.gemv(x, q.q, scale=q.scale, norm=nw, eps=1e-5, config=cfg)
        assert rel(y, F.linear(normed.float(), q.dequantize(torch.float32))) < bf16_tol()


@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_epilogue_inputs_read_early_or_late_give_the_same_bits(monkeypatch, rows):
    """kernels.GEMV_LATE_EPILOGUE moves only where the FMA GEMV reads its row scales, bias and
    residual (before or right after the wait for the inputs, or after the products): the
    outputs are equal bit for bit either way, and to the tensor-core kernel's within bf16."""
    from engine.runtime.cuda import kernels
    from engine.runtime.cuda.fp8 import quantize_rows

    g = torch.Generator(device="cpu").manual_seed(11 + rows)
    N, K = 72, 320
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, torch.bfloat16)  # noqa: E731
    x, b, res = make(rows, K), make(N), make(rows, N)
    q = quantize_rows(make(N, K) * 0.05)
    outs = []
    for late in (set(), {(1, rows), (2, rows)}):
        monkeypatch.setattr(kernels, "GEMV_LATE_EPILOGUE", late)
        for cfg in (("fma", 8, 64, 4), ("fma", 4, 128, 4, 3)):
            out = res.clone()
            kernels.gemv(x, q.q, scale=q.scale, bias=b, residual=out, out=out, config=cfg)
            outs.append(out)
    assert all(torch.equal(o, outs[i % 2]) for i, o in enumerate(outs))
    expected = res.float() + F.linear(x.float(), q.dequantize(torch.float32), b.float())
    assert rel(outs[0], expected) < bf16_tol()


@cuda_only
@pytest.mark.parametrize("m,rows", [(5, 16), (16, 16), (33, 48)])
def test_fused_activation_quantization_equals_the_torch_reference(m, rows):
    from engine.runtime.cuda.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX
    from engine.runtime.cuda.kernels import quantize_rows_fp8

    def quantize_activations(x, rows):  # the torch reference: padded rows are zeros with scale 1
        xf = F.pad(x, (0, 0, 0, rows - x.shape[0])).float()
        xs = xf.abs().amax(dim=1, keepdim=True).clamp_min_(_MIN_SCALE) / FP8_MAX
        xs[x.shape[0]:] = 1.0
        return (xf / xs).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), xs

    g = torch.Generator(device="cpu").manual_seed(m)
    x = (torch.randn(m, 320, generator=g) * torch.rand(m, 1, generator=g) * 4).to(DEVICE, torch.bfloat16)
    x[1] = 0  # an all-zero row keeps a finite scale
    q, scale = quantize_rows_fp8(x, rows, _MIN_SCALE, FP8_MAX)
    q_ref, scale_ref = quantize_activations(x, rows)
    assert q.shape == (rows, 320) and scale.shape == (rows, 1)
    # Same scales up to the last bit of float32 (a division may round where a multiply by the
    # reciprocal does not), so at most a rare value lands on the neighbouring e4m3 step.
    torch.testing.assert_close(scale, scale_ref, rtol=2.5e-7, atol=0)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3
    torch.testing.assert_close(q.float() * scale, q_ref.float() * scale_ref, rtol=0.07, atol=1e-30)
    assert torch.equal(q[m:].float(), torch.zeros(rows - m, 320, device=DEVICE))


@cuda_only
@pytest.mark.parametrize("prologue", ["norm", "act"])
def test_quantization_with_a_fused_prologue_equals_the_kernels_in_turn(prologue):
    """RMSNorm or SiLU * up fused into the activations' quantization: bit for bit what
    rms_norm or silu_mul and then the plain quantization give (padding rows included)."""
    from engine.runtime.cuda.fp8 import _MIN_SCALE, FP8_MAX
    from engine.runtime.cuda.kernels import quantize_rows_fp8, rms_norm, silu_mul

    g = torch.Generator(device="cpu").manual_seed(3)
    x = (torch.randn(37, 640, generator=g) * 3).to(DEVICE, torch.bfloat16)
    weight = torch.randn(640 if prologue == "norm" else 320, generator=g).to(DEVICE, torch.bfloat16)
    if prologue == "norm":
        fused = quantize_rows_fp8(x, 48, _MIN_SCALE, FP8_MAX, norm=weight, eps=1e-5)
        apart = quantize_rows_fp8(rms_norm(x, weight, 1e-5), 48, _MIN_SCALE, FP8_MAX)
    else:
        fused = quantize_rows_fp8(x, 48, _MIN_SCALE, FP8_MAX, act=True)
        apart = quantize_rows_fp8(silu_mul(x), 48, _MIN_SCALE, FP8_MAX)
    (q, scale), (q_ref, scale_ref) = fused, apart
    assert q.shape == q_ref.shape == (48, 640 if prologue == "norm" else 320)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


@cuda_only
def test_quantization_divides_by_the_scale_as_div_rn_does(monkeypatch):
    """The quantization's reciprocal-and-FMA division gives div_rn's quotients: the same
    e4m3 bytes over rows of widely different magnitudes and rows of exact multiples of
    scale / 448 (quotients on e4m3's grid); negative zeros come out as +0 (the same value)."""
    from engine.runtime.cuda import kernels
    from engine.runtime.cuda.fp8 import _MIN_SCALE, FP8_MAX

    g = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(2048, 1024, generator=g) * torch.exp(torch.randn(2048, 1, generator=g) * 4)
    grid = torch.randint(-448, 449, (64, 1024), generator=g).float() / 448
    x[:64] = grid * x[:64].abs().amax(1, keepdim=True)
    x[64:, ::97] = -0.0  # a SiLU * up that underflows: e4m3 keeps the sign of zero, as torch does
    x = x.to(DEVICE, torch.bfloat16)
    results = {}
    for fma in (False, True):
        monkeypatch.setattr(kernels, "QUANT_FMA_DIVISION", fma)
        q, scale = kernels.quantize_rows_fp8(x, 2048, _MIN_SCALE, FP8_MAX)
        results[fma] = q.view(torch.uint8), scale
    (fast, fast_scale), (exact, exact_scale) = results[True], results[False]
    assert torch.equal(fast_scale, exact_scale)
    negative_zero = (x == 0) & torch.signbit(x)  # inputs of -0 (tiny negative quotients stay 0x80 both ways)
    assert negative_zero.sum() == (2048 - 64) * 11
    assert torch.all(exact[negative_zero] == 0x80) and torch.all(fast[negative_zero] == 0)
    assert torch.equal(fast[~negative_zero], exact[~negative_zero])


@cuda_only
def test_quantization_with_the_residual_add_fused_equals_the_add_then_the_kernel():
    """The previous projection's residual add fused into the next one's quantization: the
    residual stream ends as x.add_(branch) leaves it, and the FP8 rows and scales are
    bit for bit those of the RMSNorm-fused quantization of that stream."""
    from engine.runtime.cuda.fp8 import _MIN_SCALE, FP8_MAX
    from engine.runtime.cuda.kernels import quantize_rows_fp8

    g = torch.Generator(device="cpu").manual_seed(5)
    x = (torch.randn(37, 640, generator=g) * 3).to(DEVICE, torch.bfloat16)
    branch = torch.randn(37, 640, generator=g).to(DEVICE, torch.bfloat16)
    weight = torch.randn(640, generator=g).to(DEVICE, torch.bfloat16)
    fused_x, apart_x = x.clone(), x.clone().add_(branch)
    q, scale = quantize_rows_fp8(fused_x, 48, _MIN_SCALE, FP8_MAX, norm=weight, eps=1e-5, add=branch)
    q_ref, scale_ref = quantize_rows_fp8(apart_x, 48, _MIN_SCALE, FP8_MAX, norm=weight, eps=1e-5)
    assert torch.equal(fused_x, apart_x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("T", [5, 100])  # one token per program; 16 per program, the last block partly masked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_write(dtype, T):
    from engine.models.rope import RopeTable
    from engine.runtime.base import ModelSpec
    from engine.runtime.cuda.kernels import rope_and_cache

    H, KVH, D = 6, 2, 32
    spec = ModelSpec("llama", 10, H * D, 8, 1, H, KVH, D, 1e-6, 10000.0, 64, False)
    ref_table = RopeTable(spec, 64, dtype, "cpu")
    if dtype == torch.float32:  # complex table: cos + i sin
        cos_sin = torch.stack([ref_table.table.real, ref_table.table.imag])
    else:
        cos_sin = ref_table.table
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype)
    if T == 5:
        positions = torch.tensor([0, 3, 7, 20, 63])
        slots = torch.tensor([5, -1, 0, 17, 30])
    else:
        positions = torch.randint(0, 64, (T,), generator=g)
        slots = torch.randperm(128, generator=g)[:T]
        slots[::7] = -1
    expected = qkv.clone().view(T, -1, D)
    ref_table.apply_(expected[:, : H + KVH], ref_table.lookup(positions))
    ours = qkv.to(DEVICE)
    cache = torch.zeros(16, 8, 2 * KVH, D, dtype=dtype, device=DEVICE)
    rope_and_cache(ours, positions.to(DEVICE), slots.to(DEVICE), cos_sin.to(DEVICE).contiguous(), cache, H, KVH, D)
    ours = ours.cpu().view(T, -1, D)
    if INTERPRET and dtype == torch.bfloat16:
        torch.testing.assert_close(ours, expected, atol=2e-2, rtol=2e-2)
    elif dtype == torch.bfloat16:
        # Same ops and roundings as torch on the CPU, bit for bit. (With Triton's default FMA
        # contraction, up to ~9% of the results differed by one rounding of a product.)
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    flat = cache.cpu().view(-1, 2 * KVH, D)
    written = {}
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            written[s] = t
            assert torch.equal(flat[s], ours[t, H:])
    untouched = [i for i in range(flat.shape[0]) if i not in written]
    assert flat[untouched].abs().sum() == 0


def fp8_capable() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9)


@cuda_only
def test_rope_and_cache_write_fp8():
    """An FP8 cache holds the rotated bf16 keys and the values rounded to e4m3, and
    saturates at +-448 instead of overflowing to NaN."""
    from engine.runtime.cuda.kernels import rope_and_cache

    if not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9+")
    H, KVH, D, T = 4, 2, 32, 3
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qkv[1, (H + KVH) * D] = 1000.0  # a value beyond e4m3's range
    table = torch.randn(2, 16, D // 2).to(torch.bfloat16).to(DEVICE)
    positions, slots = torch.tensor([1, 2, 3], device=DEVICE), torch.tensor([0, 5, 9], device=DEVICE)
    wide = torch.zeros(4, 4, 2 * KVH, D, dtype=torch.bfloat16, device=DEVICE)
    narrow = torch.zeros(4, 4, 2 * KVH, D, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
    rope_and_cache(qkv.to(DEVICE), positions, slots, table, wide, H, KVH, D)
    rope_and_cache(qkv.to(DEVICE), positions, slots, table, narrow, H, KVH, D)
    expected = wide.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(narrow.view(torch.uint8), expected.view(torch.uint8))
    assert narrow.float().view(-1, 2 * KVH, D)[5, KVH, 0] == 448.0


def ref_decode_attention(q, cache, tables, ctx, H, KVH, D, scale, window=None):
    B = q.shape[0]
    out = torch.zeros(B, H * D, dtype=torch.float64)
    group = H // KVH
    for b in range(B):
        L = int(ctx[b])
        if L == 0:
            continue
        kv = cache[tables[b].long()].flatten(0, 1)[:L].double()
        qq = q[b, : H * D].view(H, D).double()
        for h in range(H):
            s = (kv[:, h // group] @ qq[h]) * scale
            if window:
                s[: max(0, L - window)] = -float("inf")
            out[b, h * D : (h + 1) * D] = s.softmax(0) @ kv[:, KVH + h // group]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("splits", [1, 3, 16])  # 16: more splits than most contexts have tiles
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("early_kv", [False, True])  # True: the newest token apart from the tiles
def test_paged_decode_attention(heads, kv_heads, splits, window, early_kv):
    from engine.runtime.cuda.kernels import paged_decode_attention

    g = torch.Generator().manual_seed(heads + splits)
    D, block_size, blocks = 64, 16, 40
    cache = torch.randn(blocks, block_size, 2 * kv_heads, D, generator=g).to(torch.bfloat16)
    ctx = torch.tensor([37, 0, 5, 200])  # 200: several 64-token tiles, uneven splits
    tables = (torch.randperm(4 * 13, generator=g) % blocks).view(4, 13)
    q = torch.randn(4, (heads + 2 * kv_heads) * D, generator=g).to(torch.bfloat16)
    out = torch.full((4, heads * D), float("nan"), device=DEVICE)
    paged_decode_attention(q.to(DEVICE), cache.to(DEVICE), tables.to(DEVICE), ctx.to(DEVICE), heads, kv_heads, D,
                           D**-0.5, splits, window, out=out, early_kv=early_kv)
    expected = ref_decode_attention(q, cache, tables, ctx, heads, kv_heads, D, D**-0.5, window)
    # float32 output; bf16 probabilities in the P @ V product on the GPU.
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-2 if HAS_CUDA else 1e-5, rtol=0)
    assert out[1].abs().sum() == 0  # an empty context (padding row) gives zeros


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
@pytest.mark.parametrize("early_kv", [False, True])
def test_decode_attention_with_rope_equals_rope_then_attention(heads, kv_heads, splits, window, cache_dtype,
                                                               early_kv):
    """The fused decode path (rope and the K/V write inside the attention kernel) gives the
    same output and the same cache, bit for bit, as rope_and_cache followed by the kernel
    (with the newest token attended to apart or in its tile, either way on both sides)."""
    from engine.runtime.cuda.kernels import paged_decode_attention, rope_and_cache

    if cache_dtype == "fp8" and not fp8_capable():
        pytest.skip("an FP8 cache needs a GPU of compute capability 8.9+")
    g = torch.Generator().manual_seed(heads + splits + (window or 0))
    D, block_size, P = 32, 16, 256
    B = 5
    ctx = torch.tensor([37, 0, 5, 200, 64])  # 200: several 64-token tiles, uneven splits; 64: a full tile
    max_blocks = 13
    tables = torch.randperm(B * max_blocks, generator=g).view(B, max_blocks)  # no block shared
    positions = (ctx - 1).clamp_min(0)
    slots = tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    slots[1] = -1  # padding row
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    cache = torch.randn(B * max_blocks, block_size, 2 * kv_heads, D, generator=g)
    cache = cache.to(torch.float8_e4m3fn if cache_dtype == "fp8" else dtype).to(DEVICE)
    qkv = torch.randn(B, (heads + 2 * kv_heads) * D, generator=g).to(dtype).to(DEVICE)
    angles = torch.rand(P, D // 2, generator=g) * 6.3
    table = torch.stack([angles.cos(), angles.sin()]).to(dtype).contiguous().to(DEVICE)
    args = (tables.to(DEVICE), ctx.to(DEVICE), heads, kv_heads, D, D**-0.5, splits, window)

    apart_qkv, apart_cache = qkv.clone(), cache.clone()
    rope_and_cache(apart_qkv, positions.to(DEVICE), slots.to(DEVICE), table, apart_cache, heads, kv_heads, D)
    expected = paged_decode_attention(apart_qkv, apart_cache, *args, early_kv=early_kv)

    fused_qkv, fused_cache = qkv.clone(), cache.clone()
    out = paged_decode_attention(fused_qkv, fused_cache, *args, rope=(positions.to(DEVICE), slots.to(DEVICE), table),
                                 early_kv=early_kv)
    assert torch.equal(out, expected)
    assert torch.equal(fused_cache.view(torch.uint8), apart_cache.view(torch.uint8))
    assert not torch.equal(fused_cache.view(torch.uint8), cache.view(torch.uint8))  # the new K/V went in
    assert torch.equal(fused_qkv, qkv)  # qkv itself is left as it was


@cuda_only
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_attention_over_an_fp8_cache(splits):
    from engine.runtime.cuda.kernels import paged_decode_attention

    if not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9+")
    g = torch.Generator().manual_seed(11)
    H, KVH, D, block_size = 8, 2, 64, 16
    cache = torch.randn(40, block_size, 2 * KVH, D, generator=g).to(torch.float8_e4m3fn)
    ctx = torch.tensor([37, 0, 200])
    tables = (torch.randperm(3 * 13, generator=g) % 40).view(3, 13)
    q = torch.randn(3, (H + 2 * KVH) * D, generator=g).to(torch.bfloat16)
    out = paged_decode_attention(q.to(DEVICE), cache.to(DEVICE), tables.to(DEVICE), ctx.to(DEVICE), H, KVH, D,
                                 D**-0.5, splits)
    # The reference reads the same e4m3 values, widened: only the kernel's bf16 roundings differ.
    expected = ref_decode_attention(q, cache.float(), tables, ctx, H, KVH, D, D**-0.5)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-2, rtol=0)


def ref_prefill_attention(qkv, cache, chunks, H, KVH, D, scale, window=None):
    """Each chunk's queries against its context's keys from the cache, in float64."""
    out = torch.zeros(qkv.shape[0], H * D, dtype=torch.float64)
    group = H // KVH
    for start, qlen, ctx, blocks in chunks:
        kv = cache[torch.tensor(blocks)].flatten(0, 1)[:ctx].double()
        for i in range(qlen):
            pos = ctx - qlen + i
            q = qkv[start + i, : H * D].view(H, D).double()
            for h in range(H):
                s = (kv[: pos + 1, h // group] @ q[h]) * scale
                if window:
                    s[: max(0, pos + 1 - window)] = -float("inf")
                out[start + i, h * D : (h + 1) * D] = s.softmax(0) @ kv[: pos + 1, KVH + h // group]
    return out


@cuda_only
@pytest.mark.parametrize("cached_prefix", [False, True])
@pytest.mark.parametrize("window", [None, 6])
def test_flash_prefill_attention(cached_prefix, window):
    """Chunks of different lengths, one after a cached prefix, in one varlen call; the
    fresh chunks' keys read from the projection must agree with those in the cache."""
    from engine.runtime.cuda.prefill import available, prefill_attention, prefill_inputs

    if not available(torch.bfloat16, DEVICE):
        pytest.skip("this torch has no varlen FlashAttention")
    g = torch.Generator().manual_seed(5)
    H, KVH, D, bs = 8, 2, 64, 4
    cache = torch.randn(32, bs, 2 * KVH, D, generator=g).to(torch.bfloat16)
    qkv = torch.randn(2 + 7 + 3 + 5, (H + 2 * KVH) * D, generator=g).to(torch.bfloat16)
    # Rows 0-1 are decode rows (not prefill); then chunks of 7 and 3 fresh tokens, and 5
    # tokens after 9 cached ones.
    chunks = [(2, 7, 7, [3, 9]), (9, 3, 3, [4]), (12, 5, 14, [20, 21, 22, 23])]
    if not cached_prefix:
        chunks = chunks[:2]
    for start, qlen, ctx, blocks in chunks:  # this step's keys and values, as rope_and_cache writes them
        for i in range(qlen):
            p = ctx - qlen + i
            cache[blocks[p // bs], p % bs] = qkv[start + i, H * D :].view(2 * KVH, D)
    inputs = prefill_inputs(chunks, bs, DEVICE)
    assert (inputs.kv_slots is None) == (not cached_prefix)
    out = prefill_attention(qkv.to(DEVICE), cache.to(DEVICE), inputs, H, KVH, D, D**-0.5, window)
    rows = sum(q for _, q, _, _ in chunks)
    expected = ref_prefill_attention(qkv, cache, chunks, H, KVH, D, D**-0.5, window)[2 : 2 + rows]
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-2, rtol=0)


# ---- the runtime against transformers --------------------------------------------------------


def tiny_model(kind: str, dtype: torch.dtype, **overrides):
    import transformers

    from engine import loader
    from tests.checkpoints import TINY_CONFIGS

    config = TINY_CONFIGS[kind]()
    if INTERPRET:  # the interpreter runs each Triton program in numpy: keep the lm_head small
        overrides = {"vocab_size": 512, **overrides}
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(DEVICE).eval()
    spec = loader.spec_from_config(config.to_dict())
    return model, spec


def make_runtime(spec, model, dtype, graphs=True, fp8=False, num_blocks=96, block_size=4, max_num_seqs=8,
                 kv_cache_dtype="auto", **config):
    from engine.config import EngineConfig
    from engine.runtime.cuda.runtime import CudaRuntime

    weights = {k: v.detach() for k, v in model.state_dict().items()}
    config = EngineConfig(use_cuda_graphs=graphs, max_num_seqs=max_num_seqs, block_size=block_size,
                          kv_cache_dtype=kv_cache_dtype, **config)
    runtime = CudaRuntime(spec, weights, dtype, DEVICE, use_fp8=fp8, config=config, max_model_len=256)
    runtime.init_kv_cache(num_blocks, block_size)
    return runtime


def on_device(batch):
    return dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name).to(DEVICE) for f in dataclasses.fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor)})


class DeviceRuntime:
    """Moves paged_driver's CPU batches to the device."""

    def __init__(self, runtime):
        self.runtime = runtime

    def execute(self, batch):
        return self.runtime.execute(on_device(batch)).cpu()


def run_script(runtime, seed=0, follow=None):
    """Prefill, chunked prefill over a cached prefix, mixed steps and decodes of 1-3
    sequences (padded into buckets 1, 2 and 4). Returns [(sequence tokens, pos, logits)].

    Sequences grow by their greedy token, or, with `follow` (another run's result), by
    the token that run chose at the same point (teacher forcing, to compare runtimes)."""
    from tests.engine.paged_driver import Pager, Seq, step

    g = torch.Generator().manual_seed(seed)
    vocab = runtime.spec.vocab_size
    prompt = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    rt, pager = DeviceRuntime(runtime), Pager(96, 4, seed)
    rows = []

    def take(seqs, logits, extend=True):
        for s, row in zip(seqs, logits):
            rows.append((s, s.fed - 1, row))
            if extend:
                if follow is None:
                    s.tokens.append(int(row.argmax()))
                else:
                    leader = follow[len(rows) - 1][0]
                    s.tokens.append(leader.tokens[s.fed])

    a, b, c = Seq(prompt(9)), Seq(prompt(5)), Seq(prompt(10))
    take([a, b], step(rt, pager, [], [(a, 9), (b, 5)]))
    for _ in range(3):
        take([a], step(rt, pager, [a], []))
    logits = step(rt, pager, [a, b], [(c, 4)])
    take([a, b], logits[:2])
    take([c], logits[2:], extend=False)
    take([a, b, c], step(rt, pager, [a, b], [(c, 6)]))
    for _ in range(4):
        take([a, b, c], step(rt, pager, [a, b, c], []))
    for _ in range(2):
        take([b, c], step(rt, pager, [b, c], []))
    return rows


def compare_with_reference(model, rows):
    """(max abs diff, max relative error per row, greedy agreement) against the model's full forward."""
    worst_abs, worst_rel, agree = 0.0, 0.0, True
    cache = {}
    for seq, pos, ours in rows:
        key = id(seq)
        if key not in cache:
            with torch.no_grad():
                cache[key] = model(torch.tensor([seq.tokens[:-1]], device=DEVICE)).logits[0].float().cpu()
        ref = cache[key][pos]
        worst_abs = max(worst_abs, (ours - ref).abs().max().item())
        worst_rel = max(worst_rel, rel(ours, ref))
        agree &= int(ours.argmax()) == int(ref.argmax())
    return worst_abs, worst_rel, agree


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "mistral", "qwen2"])
def test_float32_runtime_matches_transformers(kind):
    model, spec = tiny_model(kind, torch.float32)
    rows = run_script(make_runtime(spec, model, torch.float32, graphs=HAS_CUDA))
    worst_abs, _, agree = compare_with_reference(model, rows)
    assert worst_abs < 1e-4 and agree, worst_abs


def test_sliding_window_matches_transformers():
    model, spec = tiny_model("mistral", torch.float32, sliding_window=5)
    assert spec.sliding_window == 5
    rows = run_script(make_runtime(spec, model, torch.float32, graphs=HAS_CUDA))
    worst_abs, _, agree = compare_with_reference(model, rows)
    assert worst_abs < 1e-4 and agree, worst_abs


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5})])
def test_bf16_runtime_close_to_transformers(kind, overrides):
    model, spec = tiny_model(kind, torch.bfloat16, **overrides)
    rows = run_script(make_runtime(spec, model, torch.bfloat16, graphs=HAS_CUDA))
    _, worst_rel, _ = compare_with_reference(model, rows)
    assert worst_rel < (6e-2 if INTERPRET else 2e-2), worst_rel  # the interpreter truncates to bf16


@cuda_only
def test_graph_replay_equals_eager_decode():
    model, spec = tiny_model("llama", torch.bfloat16)
    graphed = make_runtime(spec, model, torch.bfloat16, graphs=True)
    eager = make_runtime(spec, model, torch.bfloat16, graphs=False)
    a, b = run_script(graphed), run_script(eager)
    assert graphed._graphs and not eager._graphs  # buckets 1, 2 and 4 were captured
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b))


def written_slots(runtime) -> torch.Tensor:
    """[layers, blocks, block_size] bool: cache slots holding any nonzero byte."""
    return runtime.kv_cache.view(torch.uint8).flatten(-2).ne(0).any(-1)


def prefill_script(runtime, length):
    """A lone prompt of `length` tokens, two decode steps, then a fresh prompt of `length`
    tokens beside that sequence's decode row, then three decode steps of both. The tokens
    fed are fixed (not the greedy ones), so that runtimes can be compared step by step.
    Returns every step's logits, concatenated."""
    from tests.engine.paged_driver import Pager, Seq, step

    g = torch.Generator().manual_seed(5)
    tokens = lambda n: torch.randint(3, runtime.spec.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rt, pager = DeviceRuntime(runtime), Pager(96, 4, 1)
    a, b = Seq(tokens(length + 5)), Seq(tokens(length + 3))
    logits = [step(rt, pager, [], [(a, length)])]
    logits += [step(rt, pager, [a], []) for _ in range(2)]
    logits.append(step(rt, pager, [a], [(b, length)]))
    logits += [step(rt, pager, [a, b], []) for _ in range(3)]
    return torch.cat(logits)


@cuda_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("length", [16, 11])  # a graph length; padded to 16
def test_prefill_graphs_equal_the_same_steps_eagerly(fp8, length):
    """A lone fresh prompt, and a fresh prompt beside a decode row, replay prefill graphs
    ((0, 16) and (1, 16)). Their logits and the K/V they write equal, bit for bit, those
    of the same padded steps run eagerly (use_cuda_graphs=False); the padding rows write
    no K/V. Against steps not padded at all (prefill_graph_tokens=()) they are equal where
    nothing was padded (a 16-token prompt alone) and within bf16 rounding elsewhere: the
    projections' products then run at another row count, which cuBLAS may sum in another
    order, and the decode rows' attention at another split count."""
    if fp8 and not fp8_capable():
        pytest.skip("FP8 weights need compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16)
    runtimes = {"graph": make_runtime(spec, model, torch.bfloat16, graphs=True, fp8=fp8),
                "eager": make_runtime(spec, model, torch.bfloat16, graphs=False, fp8=fp8),
                "unpadded": make_runtime(spec, model, torch.bfloat16, graphs=True, fp8=fp8, prefill_graph_tokens=())}
    logits = {k: prefill_script(rt, length) for k, rt in runtimes.items()}
    graphed, eager, unpadded = runtimes.values()
    assert sorted(graphed._prefill_graphs) == [(0, 16), (1, 16)]
    assert not eager._prefill_graphs and not unpadded._prefill_graphs
    # What the scheduler is told (it keeps few waiting prompts to one a step for these graphs).
    assert graphed.prompt_graph_limits.max_tokens == graphed.prefill_graph_tokens[-1]
    assert eager.prompt_graph_limits is None and unpadded.prompt_graph_limits is None
    assert torch.equal(logits["graph"], logits["eager"])
    assert torch.equal(graphed.kv_cache.view(torch.uint8), eager.kv_cache.view(torch.uint8))
    assert torch.equal(written_slots(graphed), written_slots(unpadded))
    if length == 16:
        assert torch.equal(logits["graph"][0], logits["unpadded"][0])
    assert rel(logits["graph"], logits["unpadded"]) < 1e-2, rel(logits["graph"], logits["unpadded"])


@cuda_only
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_rope_inside_decode_attention_changes_no_logits(kv_cache_dtype):
    """Small decode-only steps do rope and the K/V write inside the attention kernel; the logits
    of the whole script (prefills, mixed steps, decodes of 1 to 3 sequences, graphs) equal,
    bit for bit, those of rope_and_cache followed by the attention kernel."""
    if kv_cache_dtype == "fp8" and not fp8_capable():
        pytest.skip("an FP8 cache needs compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16)
    fused = make_runtime(spec, model, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
    apart = make_runtime(spec, model, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
    fused.model.rope_in_attention_rows = 8  # every decode bucket of the script (1, 2 and 4 rows)
    apart.model.rope_in_attention_rows = 0
    a, b = run_script(fused), run_script(apart)
    assert len(a) == len(b) and all(torch.equal(x[2], y[2]) for x, y in zip(a, b))


@cuda_only
@pytest.mark.parametrize("fp8", [False, True])
def test_programmatic_dependent_launch_changes_no_logits(fp8, monkeypatch):
    """Under PDL each kernel may start before the previous one ends, and waits for its
    inputs inside: the logits must equal, bit for bit, those of kernels launched one after
    the other. PDL covers one-row steps (the script's single-sequence decodes, captured
    in the bucket-1 graph); the other steps check that mixing the two launch kinds in one
    runtime changes nothing either."""
    from engine.runtime.cuda import kernels

    if not kernels._pdl(1) or (fp8 and not fp8_capable()):
        pytest.skip("PDL needs compute capability >= 9 (FP8 weights >= 8.9)")
    model, spec = tiny_model("llama", torch.bfloat16)
    launched_early = run_script(make_runtime(spec, model, torch.bfloat16, graphs=True, fp8=fp8))
    monkeypatch.setattr(kernels, "PDL", False)
    in_turn = run_script(make_runtime(spec, model, torch.bfloat16, graphs=True, fp8=fp8))
    assert len(launched_early) == len(in_turn)
    assert all(torch.equal(x[2], y[2]) for x, y in zip(launched_early, in_turn))


@cuda_only
def test_fp8_weights_stay_close_to_bf16():
    from engine.runtime.cuda.fp8 import Fp8Weight
    from engine.runtime.cuda.runtime import fp8_supported

    if not fp8_supported(DEVICE):
        pytest.skip("FP8 needs compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16)
    fp8 = make_runtime(spec, model, torch.bfloat16, fp8=True)
    assert fp8.fp8_enabled and isinstance(fp8.model.layers[0].qkv, Fp8Weight)
    bf16 = make_runtime(spec, model, torch.bfloat16)
    layer_bytes = lambda rt: rt.model.weight_bytes() - 2 * rt.model.embed.numel() * 2  # noqa: E731 (untied: embed + lm_head)
    assert layer_bytes(fp8) < 0.6 * layer_bytes(bf16)
    theirs = run_script(bf16)
    ours = run_script(fp8, follow=theirs)  # the same tokens as the bf16 run
    errs = [rel(x[2], y[2]) for x, y in zip(ours, theirs)]
    top1 = sum(int(x[2].argmax()) == int(y[2].argmax()) for x, y in zip(ours, theirs)) / len(ours)
    assert max(errs) < 0.15 and top1 >= 0.8, (errs, top1)


@cuda_only
@pytest.mark.parametrize("tied", [False, True])
def test_fp8_lm_head_stays_close_to_fp8_layers_alone(tied):
    """fp8_lm_head: the LM head in e4m3 with per-row scales (its own copy when tied to the
    embedding, whose lookup stays bf16); logits close to those of FP8 layers alone."""
    from engine.runtime.cuda.fp8 import Fp8Weight
    from engine.runtime.cuda.runtime import fp8_supported

    if not fp8_supported(DEVICE):
        pytest.skip("FP8 needs compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16, tie_word_embeddings=tied)
    assert spec.tie_word_embeddings == tied
    head8 = make_runtime(spec, model, torch.bfloat16, fp8=True, fp8_lm_head=True)
    layers8 = make_runtime(spec, model, torch.bfloat16, fp8=True)
    assert isinstance(head8.model.lm_head, Fp8Weight) and not isinstance(layers8.model.lm_head, Fp8Weight)
    assert head8.model.embed.dtype == torch.bfloat16
    vocab, hidden = spec.vocab_size, spec.hidden_size
    # Untied, the head's bf16 bytes become FP8 bytes and row scales; tied, those are added.
    change = vocab * (hidden + 4) - (0 if tied else 2 * vocab * hidden)
    assert head8.model.weight_bytes() - layers8.model.weight_bytes() == change
    theirs = run_script(layers8)
    ours = run_script(head8, follow=theirs)
    errs = [rel(x[2], y[2]) for x, y in zip(ours, theirs)]
    top1 = sum(int(x[2].argmax()) == int(y[2].argmax()) for x, y in zip(ours, theirs)) / len(ours)
    print(f"FP8 LM head against FP8 layers alone: max rel err {max(errs):.4f}, top-1 {top1:.3f}")
    assert 0 < max(errs) < 0.1 and top1 >= 0.8, (errs, top1)


@cuda_only
def test_fp8_kv_cache_stays_close_to_bf16():
    """The same script over an FP8 cache, fed the bf16 run's tokens: prefill, chunked
    prefill over a cached prefix (read back from the FP8 cache), and graph decodes."""
    if not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16)
    kv8 = make_runtime(spec, model, torch.bfloat16, kv_cache_dtype="fp8")
    bf16 = make_runtime(spec, model, torch.bfloat16)
    assert kv8.kv_cache.dtype == torch.float8_e4m3fn
    assert 2 * kv8.kv_cache_bytes_per_block(16) == bf16.kv_cache_bytes_per_block(16)
    theirs = run_script(bf16)
    ours = run_script(kv8, follow=theirs)
    errs = [rel(x[2], y[2]) for x, y in zip(ours, theirs)]
    top1 = sum(int(x[2].argmax()) == int(y[2].argmax()) for x, y in zip(ours, theirs)) / len(ours)
    print(f"fp8 KV against bf16 KV: max rel err {max(errs):.4f}, top-1 {top1:.3f}")
    assert max(errs) < 0.15 and top1 >= 0.8, (errs, top1)


@cuda_only
def test_copy_on_write_copies_fp8_blocks():
    """Beams fork blocks: copy_blocks must move an FP8 cache's bytes in every layer."""
    if not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9+")
    model, spec = tiny_model("llama", torch.bfloat16)
    runtime = make_runtime(spec, model, torch.bfloat16, kv_cache_dtype="fp8")
    values = torch.randn(runtime.kv_cache.shape, device=DEVICE).to(torch.float8_e4m3fn)
    runtime.kv_cache.view(torch.uint8).copy_(values.view(torch.uint8))
    runtime.copy_blocks([(3, 7), (7, 9)])  # 7 is read before it is overwritten
    cache = runtime.kv_cache.view(torch.uint8)
    before = values.view(torch.uint8)
    assert torch.equal(cache[:, 7], before[:, 3]) and torch.equal(cache[:, 9], before[:, 7])
    assert torch.equal(cache[:, 3], before[:, 3])


def test_fp8_kv_cache_needs_the_cuda_runtime():
    from engine.config import EngineConfig
    from engine.runtime.cuda.runtime import CudaRuntime

    model, spec = tiny_model("llama", torch.float32)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CudaRuntime(spec, weights, torch.float32, DEVICE, config=EngineConfig(kv_cache_dtype="fp8"))


def save_checkpoint_with_tokenizer(model, folder) -> None:
    from tests.checkpoints import save_tokenizer

    model.generation_config.pad_token_id = 2
    model.save_pretrained(str(folder))
    given = os.environ.get("TEXTGEN_TEST_TOKENIZER_DIR")  # a folder of tokenizer files (no gguf there)
    try:
        if given:
            for f in os.listdir(given):
                shutil.copy(os.path.join(given, f), folder / f)
        else:
            save_tokenizer(folder)
    except Exception as exc:  # the tokenizer comes from the default model's GGUF
        pytest.skip(f"no tokenizer files: {exc}")


@cuda_only
def test_from_pretrained_on_cuda_generates_like_transformers(tmp_path):
    """The whole engine on the GPU, float32: greedy tokens equal transformers' generate."""
    from engine import AutoModelForCausalLM

    model, _ = tiny_model("llama", torch.float32)
    save_checkpoint_with_tokenizer(model, tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path), device="cuda", dtype="float32",
                                                experimental_cuda_runtime=True)
    assert type(ours.engine._loaded.loop.engine.runtime).__name__ == "CudaRuntime"
    prompt = torch.randint(3, 49152, (2, 7), generator=torch.Generator().manual_seed(3))
    got = ours.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = model.generate(prompt.to(DEVICE), max_new_tokens=12, min_new_tokens=12, do_sample=False).cpu()
    assert torch.equal(got, want)


@cuda_only
def test_from_pretrained_with_an_fp8_kv_cache(tmp_path):
    """kv_cache_dtype="fp8" through from_pretrained, the server's path: an e4m3 pool, and
    the same first token as the bf16 cache (the prefill attends to the fresh keys). Later
    tokens read the FP8 cache; their logits are held to the bf16 cache's above
    (test_fp8_kv_cache_stays_close_to_bf16), as a near-tie may flip a greedy token."""
    from engine import AutoModelForCausalLM

    if not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9+")
    model, _ = tiny_model("llama", torch.bfloat16)
    save_checkpoint_with_tokenizer(model, tmp_path)
    options = dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=4)
    wide = AutoModelForCausalLM.from_pretrained(str(tmp_path), **options)
    narrow = AutoModelForCausalLM.from_pretrained(str(tmp_path), kv_cache_dtype="fp8", **options)
    runtime = narrow.engine._loaded.loop.engine.runtime
    assert runtime.kv_cache.dtype == torch.float8_e4m3fn
    prompt = torch.randint(3, 49152, (3, 9), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    a, b = wide.generate(prompt, **kwargs), narrow.generate(prompt, **kwargs)
    assert a.shape == b.shape == (3, 25) and torch.equal(a[:, :10], b[:, :10])


@cuda_only
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("kind", ["fma", "dot"])
@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_at_llama_shapes(rows, kind, fp8):
    """Every fusion at Llama-7B shapes (many K tiles, masked K tail) on the GPU."""
    from engine.runtime.cuda.fp8 import quantize_rows
    from engine.runtime.cuda.kernels import gemv

    if kind == "fma" and rows > 4:
        pytest.skip("the FMA kernel serves up to 4 rows")
    cfg = ("fma", 8, 1024, 4, 4) if kind == "fma" else ("dot", 32, 256, 4, 4)
    g = torch.Generator(device="cuda").manual_seed(rows)
    bf = torch.bfloat16
    make = lambda *s: torch.randn(*s, generator=g, device="cuda").to(bf)  # noqa: E731
    N, K, KI = 4096, 4096, 11008
    w, wd = make(N, K) * 0.02, make(N, KI) * 0.02
    if fp8:
        q, qd = quantize_rows(w), quantize_rows(wd)
        w_arg, wd_arg, kw, kwd = q.q, qd.q, {"scale": q.scale}, {"scale": qd.scale}
        w, wd = q.dequantize(bf), qd.dequantize(bf)
    else:
        w_arg, wd_arg, kw, kwd = w, wd, {}, {}
    x, x2, nw, res = make(rows, K), make(rows, 2 * KI), make(K), make(rows, N)
    errors = {
        "plain": rel(gemv(x, w_arg, config=cfg, **kw), F.linear(x, w)),
        "norm": rel(gemv(x, w_arg, norm=nw, eps=1e-5, config=cfg, **kw), F.linear(ref_rms_norm(x, nw, 1e-5), w)),
        "act": rel(gemv(x2, wd_arg, act=True, config=cfg, **kwd), F.linear(F.silu(x2[:, :KI]) * x2[:, KI:], wd)),
    }
    out = res.clone()
    errors["res"] = rel(gemv(x, w_arg, residual=out, out=out, config=cfg, **kw), res + F.linear(x, w))
    assert max(errors.values()) < 1e-2, errors


def test_decode_inputs_fill_the_static_buffers():
    """One kernel writes a step's rows into the CUDA graph's static inputs (int32 tables
    widened); rows and table columns past the step's are left alone."""
    from engine.runtime.cuda.kernels import fill_decode_inputs

    g = torch.Generator(device="cpu").manual_seed(2)
    static = tuple(torch.full((8,), -7, dtype=torch.int64, device=DEVICE) for _ in range(4))
    static += (torch.full((8, 40), -7, dtype=torch.int64, device=DEVICE),)
    step = [torch.randint(0, 1000, (3,), generator=g).to(DEVICE) for _ in range(4)]
    tables = torch.randint(0, 5000, (3, 33), generator=g, dtype=torch.int32).to(DEVICE)
    fill_decode_inputs(*step, tables, static)
    for buffer, rows in zip(static, step):
        assert torch.equal(buffer[:3], rows) and (buffer[3:] == -7).all()
    assert torch.equal(static[4][:3, :33], tables.long())
    assert (static[4][:3, 33:] == -7).all() and (static[4][3:] == -7).all()


def test_decode_inputs_fill_takes_the_in_flight_tokens():
    """With a token feed (the engine's overlapped steps) the fill writes those rows' ids
    from the launched step's samples, the others from the step's ids: as apply_token_feed."""
    from engine.runtime.base import ForwardBatch, TokenFeed, apply_token_feed
    from engine.runtime.cuda.kernels import fill_decode_inputs

    g = torch.Generator(device="cpu").manual_seed(4)
    ids = torch.randint(0, 1000, (4,), generator=g).to(DEVICE)
    ids[[0, 2]] = 0  # in flight
    others = [torch.randint(0, 1000, (4,), generator=g).to(DEVICE) for _ in range(3)]
    tables = torch.randint(0, 5000, (4, 5), generator=g).to(DEVICE)
    samples = torch.tensor([501, 502, 503], device=DEVICE)
    feed = TokenFeed(samples, torch.tensor([2, 0], device=DEVICE), torch.tensor([0, 2], device=DEVICE))
    static = tuple(torch.full((8,), -7, dtype=torch.int64, device=DEVICE) for _ in range(4))
    static += (torch.full((8, 16), -7, dtype=torch.int64, device=DEVICE),)
    fill_decode_inputs(ids, *others, tables, static, feed=feed)
    batch = ForwardBatch(ids.clone(), *others[:2], 4, tables, others[2], [], ids, token_feed=feed)
    apply_token_feed(batch)
    assert batch.token_feed is None
    assert torch.equal(static[0][:4], batch.input_ids) and static[0][:4].tolist()[0:3:2] == [503, 501]
    assert torch.equal(static[0][4:], torch.full((4,), -7, device=DEVICE))
    for buffer, rows in zip(static[1:4], others):
        assert torch.equal(buffer[:4], rows)


@cuda_only
@pytest.mark.parametrize("vocab", [5000, 128256])
def test_greedy_kernel_equals_argmax_and_log_softmax(vocab):
    from engine.runtime.cuda.kernels import greedy_with_logprob

    g = torch.Generator(device="cpu").manual_seed(vocab)
    x = (torch.randn(37, vocab, generator=g) * 4).to(DEVICE)
    x[1, 17] = x[1, vocab - 3] = 100.0  # a tie: the first index wins, as torch.argmax
    x[3] = 0.0  # all equal
    x[5, : vocab // 2] = float("-inf")  # masked tokens
    tokens, packed = greedy_with_logprob(x)
    assert torch.equal(tokens, x.argmax(dim=-1))
    assert packed.dtype == torch.float64 and torch.equal(packed[:, 0], tokens.double())
    expected = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])
    # Same value up to float32 summation order over the vocabulary and Triton's exp; the
    # float64 column holds a float32 value.
    assert torch.equal(packed[:, 1:], packed[:, 1:].float().double())
    torch.testing.assert_close(packed[:, 1:].float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_greedy_kernel_skips_banned_ids_and_reports_the_raw_logprob(shared):
    """min_new_tokens in the fused kernel: the banned ids are never chosen (as if -inf, as
    the processor masks them), and the logprob is the raw logits' log-softmax."""
    from engine.runtime.cuda.kernels import GREEDY_BANS, greedy_with_logprob

    g = torch.Generator(device="cpu").manual_seed(3)
    vocab = 3000
    x = torch.randn(5, vocab, generator=g) * 4
    x[:, 7] = 50.0  # a banned id far above the rest: the log-softmax is taken against it
    x[:, vocab - 1] = 40.0  # banned too, in the last (partial) block
    x[2, 11] = 60.0  # not banned in row 2 (per-row lists only)
    if shared:
        ids = [7, vocab - 1, 11]
        bans = torch.tensor(ids + [-1] * (GREEDY_BANS - len(ids)))
        rows_ids = [ids] * 5
    else:
        rows_ids = [[7, vocab - 1], [7, vocab - 1, 11], [7, vocab - 1], [], list(range(7, 7 + 9)) + [vocab - 1]]
        width = 2 * GREEDY_BANS
        bans = torch.tensor([ids + [-1] * (width - len(ids)) for ids in rows_ids])
    tokens, packed = greedy_with_logprob(x.to(DEVICE), bans.to(DEVICE))
    masked = x.clone()
    for row, ids in enumerate(rows_ids):
        masked[row, ids] = float("-inf")
    assert torch.equal(tokens.cpu(), masked.argmax(dim=-1))
    expected = torch.log_softmax(x, dim=-1).gather(1, tokens.cpu()[:, None])
    torch.testing.assert_close(packed[:, 1:].float().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed[:, 0].cpu(), tokens.cpu().double())


@cuda_only
def test_compile_watch_sees_the_compilations_of_triton_on_this_machine():
    """The hooks compile_watch chains into Triton are called by this Triton: a kernel
    compiled for a new constant shows up with that constant."""
    import triton
    import triton.language as tl

    from engine.runtime.cuda import compile_watch

    @triton.jit
    def _watched_probe(x_ptr, VALUE: tl.constexpr):
        tl.store(x_ptr, VALUE)

    compile_watch.install()
    x = torch.zeros(1, device=DEVICE)
    _watched_probe[(1,)](x, VALUE=7)
    torch.cuda.synchronize()
    assert x.item() == 7
    seen = {name: spec for name, spec in compile_watch.WATCH._last.items() if name.endswith("_watched_probe")}
    assert [spec["VALUE"] for spec in seen.values()] == ["=7"]


@cuda_only
def test_sampler_on_the_gpu_matches_the_cpu_for_greedy_rows():
    """Plain greedy rows take the fused kernel on the GPU; rows that need the full
    log-softmax (logprobs alternatives, penalties) do not. Same tokens and logprobs as on
    the CPU."""
    from engine.params import SamplingParams
    from engine.sampling.sampler import Sampler, SampleRow

    g = torch.Generator(device="cpu").manual_seed(7)
    logits = torch.randn(6, 3000, generator=g) * 3
    plain = [SampleRow(SamplingParams(), [1, 2, 3], 0, None) for _ in range(6)]
    mixed = plain[:4] + [SampleRow(SamplingParams(logprobs=2), [1, 2], 0, None),
                         SampleRow(SamplingParams(repetition_penalty=1.5), [5, 9], 0, None)]
    # min_new_tokens: each row's best token is a stop id it may not choose yet (the fused
    # kernel's bans), one list for all rows, then lists that differ and rows past their minimum.
    best = logits.argmax(dim=-1).tolist()
    waiting = [SampleRow(SamplingParams(min_new_tokens=5, eos_token_ids=tuple(best)), [1], 2, None) for _ in range(6)]
    apart = [SampleRow(SamplingParams(min_new_tokens=5, eos_token_ids=(best[i],), stop_token_ids=(3,)), [1], 2 + i, None)
             for i in range(6)]
    for rows in (plain, mixed, waiting, apart):
        on_gpu, on_cpu = Sampler().sample(logits.to(DEVICE), rows), Sampler().sample(logits, rows)
        assert [r.token_id for r in on_gpu] == [r.token_id for r in on_cpu]
        # The runtime hands out bf16 logits for decode steps: the sampler reads them as
        # their float32 widening, exactly (the fused kernel widens as it reads).
        half = logits.to(torch.bfloat16)
        from_bf16, from_f32 = Sampler().sample(half.to(DEVICE), rows), Sampler().sample(half.float().to(DEVICE), rows)
        assert [(r.token_id, r.logprob, r.top_logprobs) for r in from_bf16] == [
            (r.token_id, r.logprob, r.top_logprobs) for r in from_f32]
        assert [r.logprob for r in on_gpu] == pytest.approx([r.logprob for r in on_cpu], abs=1e-5)
        for ours, theirs in zip(on_gpu, on_cpu):
            assert [t for t, _ in ours.top_logprobs] == [t for t, _ in theirs.top_logprobs]
            assert [v for _, v in ours.top_logprobs] == pytest.approx([v for _, v in theirs.top_logprobs], abs=1e-5)


@cuda_only
def test_norm_and_silu_kernels_at_llama_shapes():
    from engine.runtime.cuda.kernels import rms_norm, silu_mul

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 4096, generator=g, device="cuda").to(torch.bfloat16)
    w = torch.randn(4096, generator=g, device="cuda").to(torch.bfloat16)
    ours, ref = rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5)
    assert (ours == ref).float().mean() > 0.99 and rel(ours, ref) < 1e-2
    x2 = torch.randn(128, 2 * 11008, generator=g, device="cuda").to(torch.bfloat16)
    ours, ref = silu_mul(x2), F.silu(x2[:, :11008]) * x2[:, 11008:]
    assert (ours == ref).float().mean() > 0.99 and rel(ours, ref) < 1e-2


SERVE_WITHOUT_COMPILING = """
import sys
import torch
from engine.config import EngineConfig
from engine.factory import build_engine
from engine.generation_config import resolve_sampling_params
from engine.runtime.cuda import compile_watch
from engine.sequence import Request

config = EngineConfig(block_size=4, max_num_seqs=16, num_kv_blocks=1024, capture_graphs_at_start=True)
engine = build_engine(sys.argv[1], config, False, "bfloat16", "cuda")
assert compile_watch.WATCH.warm
g = torch.Generator().manual_seed(5)


def add(name, length, new_tokens):
    prompt = torch.randint(3, 49152, (length,), generator=g).tolist()
    params = resolve_sampling_params({}, None, prompt_len=length, max_model_len=engine.max_model_len,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    engine.add_request(Request(name, prompt, params, lambda output: None))


# A long stream whose block table grows past 16, 32 and 64 blocks (widths divisible by 16
# and not); beside it, every 23 steps, two or three prompts of odd and even lengths that
# arrive together (a step no graph takes: it runs eagerly, its decode rows beside the
# prompts, its packed inputs at offsets of every parity).
add("long", 7, 330)
for step in range(330):
    if step % 23 == 1:
        for k in range(2 + step % 2):
            add(f"s{step}-{k}", 5 + k + step % 4, 30)
    engine.step()
# Then more rows at once than the greedy kernel's few-rows tile takes (GREEDY_FEW_ROWS).
for k in range(10):
    add(f"burst-{k}", 6 + k, 4)
while engine.has_work:
    engine.step()
print("compiled while serving:", compile_watch.WATCH.compiled_while_serving)
"""


@cuda_only
def test_serving_after_the_warm_up_compiles_no_kernel(tmp_path):
    """After the runtime's warm-up, eager steps (prompts that arrive together, decode rows
    beside them, block tables of any width) launch only kernels that are compiled already:
    each compilation would stall the step loop (0.2 to 1.4 s on the H100). Run in a fresh
    process with an empty Triton cache, so that no earlier test compiled anything for it."""
    import subprocess
    import sys

    model, _ = tiny_model("llama", torch.bfloat16)
    save_checkpoint_with_tokenizer(model, tmp_path / "model")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    done = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_COMPILING, str(tmp_path / "model")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled while serving: 0" in done.stdout, (done.stdout + done.stderr)[-3000:]
