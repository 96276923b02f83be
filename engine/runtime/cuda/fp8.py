"""FP8 (e4m3) weights with one scale per output channel (row).

Decode (a few rows) reads them through the Triton GEMV (FP8 weights times bf16
activations, float32 accumulation). Larger batches and prefill go through
torch._scaled_mm with the activations quantized per row (token) on the fly; it needs
M padded to a multiple of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12


@dataclass
class Fp8Weight:
    q: torch.Tensor  # [N, K] float8_e4m3fn, row-major
    scale: torch.Tensor  # [N] float32: w[n] ~= q[n] * scale[n]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)


def quantize_rows(w: torch.Tensor, chunk_rows: int = 4096) -> Fp8Weight:
    """Per-row absmax scaling into e4m3 (done in row chunks to bound the float32 temporaries)."""
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for start in range(0, n, chunk_rows):
        part = w[start : start + chunk_rows].float()
        s = part.abs().amax(dim=1).clamp_min(_MIN_SCALE) / FP8_MAX
        q[start : start + chunk_rows] = (part / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start : start + chunk_rows] = s
    return Fp8Weight(q, scale)


def scaled_mm_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, *,
                     norm: torch.Tensor | None = None, eps: float = 0.0, act: bool = False,
                     add: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """f(x) [M, K] (bf16/fp16) @ w.T through torch._scaled_mm with row-wise scales; f is
    RMSNorm times `norm`, SiLU(gate) * up (`act`, x = [gate | up]) or the identity.
    add (with norm): x += add in place first, in the same pass as the quantization.
    fast_accum: _scaled_mm's use_fast_accum (EngineConfig.fp8_fast_accum)."""
    # Imported here: the weights' quantization above needs no Triton (bench/fp8_accuracy.py
    # runs it on the CPU).
    from engine.runtime.cuda.kernels import quantize_rows_fp8, rms_norm, silu_mul

    m = x.shape[0]
    if x.device.type != "cuda":  # CPU tests: the same function, dequantized
        if add is not None:
            x.add_(add)
        if norm is not None:
            x = rms_norm(x, norm, eps)
        if act:
            x = silu_mul(x)
        y = F.linear(x, w.dequantize(x.dtype))
        return y if bias is None else y + bias
    # One kernel for the prologue and the activations (norm or SiLU, absmax, scale and
    # cast in one read of each row): the quantization alone in torch ops launches five,
    # which cost more than the FP8 GEMM saved at 256 rows on the H100 (docs/benchmarks.md).
    xq, xs = quantize_rows_fp8(x, m + (-m) % 16, _MIN_SCALE, FP8_MAX, norm=norm, eps=eps, act=act, add=add)
    y = torch._scaled_mm(xq, w.q.t(), scale_a=xs, scale_b=w.scale[None, :], out_dtype=x.dtype,
                         use_fast_accum=fast_accum)
    y = y[:m]
    return y if bias is None else y + bias

