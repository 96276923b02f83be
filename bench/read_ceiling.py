"""How close the one-row decode GEMV is to a kernel that only reads its weight.

For each Llama-2-7B projection shape and weight dtype (bf16, FP8 e4m3), three launches
over the same rotating weight copies (so L2 never serves them), isolated, CUDA graphs of
one launch per copy:
- `gemv`: the engine's kernel at one row, with the fusions the model uses (RMSNorm into
  q|k|v and gate|up, SiLU * up into down, the residual add into o and down);
- `read`: a kernel with the same tile config that loads every weight element, widens it
  to float32 and sums it per row: the GEMV's weight stream with no activation, no
  products and no prologue;
- `copy`: a 2 GiB device-to-device copy in the same call, for the HBM ceiling.

Then the read ceiling by size: a plain 1-D streaming read (4,096 or 8,192 bytes a program,
one load each, summed) over one buffer of each projection's FP8 size, the 7B LM head's
bf16 size and 2 GiB, rotating copies, graphs of back-to-back launches. A kernel that
streams N bytes pays a start (the first loads' latency) and an end (its last programs'
drain) that do not shrink with N, so the rate it can reach grows with N.

gemv / read near 1 means the GEMV's own work hides under its weight stream, and that the
stream (tile shape, pipeline depth, ramp at the kernel's start and end) is what bounds it.

Usage (on the GPU): python bench/read_ceiling.py
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.runtime.cuda import kernels  # noqa: E402
from engine.runtime.cuda.fp8 import quantize_rows  # noqa: E402

# name: (N, K, fusion)
SHAPES = {"qkv": (12288, 4096, "norm"), "o": (4096, 4096, "residual"), "gate_up": (22016, 4096, "norm"),
          "down": (4096, 11008, "act")}


@triton.jit
def _stream(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One BLOCK-byte slice of x per program, read once and summed (so that it is read)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + pid, tl.sum(v.to(tl.int32), axis=0))


# Buffer sizes (MB) of the size sweep: the 7B projections' FP8 weights (o, down, q|k|v,
# gate|up), the 7B LM head in bf16, and 2 GiB.
STREAM_MB = (16.8, 45.1, 50.3, 90.2, 262.1, 2147.5)


def stream_by_size() -> None:
    """The 1-D read's rate at each of STREAM_MB, with 4,096- and 8,192-byte programs."""
    for mb in STREAM_MB:
        nbytes = int(mb * 1e6) // 4096 * 4096
        copies = max(2, math.ceil(600e6 / nbytes))
        xs = [torch.randint(-100, 100, (nbytes,), dtype=torch.int8, device="cuda") for _ in range(copies)]
        rates = []
        for block, warps in ((4096, 4), (8192, 8)):
            grid = (triton.cdiv(nbytes, block),)
            out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
            us = _us_per_launch([functools.partial(_stream[grid], x, out, nbytes, BLOCK=block, num_warps=warps)
                                 for x in xs])
            rates.append(f"{block} B a program {nbytes / us / 1e6:.2f} TB/s ({us:.1f} us)")
        print(f"stream {mb:7.1f} MB: " + ", ".join(rates), flush=True)
        del xs
        torch.cuda.empty_cache()


@triton.jit
def _read_rows(w_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               STAGES: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :],
                    other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32)
    tl.store(out_ptr + rn, tl.sum(acc, axis=1), mask=rn < N)


def _graph(fns) -> torch.cuda.CUDAGraph:
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return graph


def _us_per_launch(fns) -> float:
    from triton.testing import do_bench

    graph = _graph(fns)
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / len(fns)


def _fusion_args(fusion: str, n: int, k: int) -> tuple[torch.Tensor, dict]:
    """The activation row and gemv() keywords of the model's call for this projection."""
    x = torch.randn(1, 2 * k if fusion == "act" else k, device="cuda", dtype=torch.bfloat16)
    if fusion == "norm":
        return x, {"norm": torch.ones(k, device="cuda", dtype=torch.bfloat16), "eps": 1e-5}
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    return x, {"residual": residual, "act": fusion == "act"}


def _measure(name: str, n: int, k: int, fusion: str, dtype: str, bf16: list[torch.Tensor]) -> None:
    """One shape and dtype: the GEMV and the read-only kernel over the same copies."""
    x, extra = _fusion_args(fusion, n, k)
    fp8 = dtype == "fp8"
    weights = [quantize_rows(w) for w in bf16] if fp8 else bf16
    _, block_n, block_k, warps, stages = kernels.gemv_config(1, n, k, fp8)
    block_k = min(block_k, kernels._next_pow2(k))
    out = torch.empty(n, device="cuda", dtype=torch.float32)
    if fp8:
        gemv = [lambda q=q: kernels.gemv(x, q.q, scale=q.scale, **extra) for q in weights]
        raw = [q.q for q in weights]
    else:
        gemv = [lambda w=w: kernels.gemv(x, w, **extra) for w in weights]
        raw = weights
    grid = (triton.cdiv(n, block_n),)
    read = [lambda w=w: _read_rows[grid](w, out, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                                         num_warps=warps) for w in raw]
    us_gemv, us_read = _us_per_launch(gemv), _us_per_launch(read)
    nbytes = n * k * (1 if fp8 else 2)
    print(f"{name:8} {n}x{k} {dtype:5} tile {block_n}x{block_k} s{stages}: gemv {us_gemv:6.2f} us "
          f"({nbytes / us_gemv / 1e6:.2f} TB/s), read {us_read:6.2f} us ({nbytes / us_read / 1e6:.2f} TB/s), "
          f"gemv / read {us_gemv / us_read:.3f}", flush=True)


def copy_rate() -> None:
    from triton.testing import do_bench

    src = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=20, return_mode="median")
    print(f"2 GiB device copy: {2 * src.numel() / ms / 1e9:.2f} TB/s read + write "
          f"({src.numel() / ms / 1e9:.2f} each way)")


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, (n, k, fusion) in SHAPES.items():
        copies = max(2, math.ceil(400e6 / (n * k * 2)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for dtype in ("bf16", "fp8"):
            _measure(name, n, k, fusion, dtype, bf16)
        del bf16
        torch.cuda.empty_cache()
    copy_rate()
    torch.cuda.empty_cache()
    stream_by_size()
    print(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
