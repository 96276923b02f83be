"""CPU benchmark of the default model: our engine against transformers, in one run.

Measures, on this machine, in this process:
  - the CPU roofline: read bandwidth / weight bytes a decode step must read;
  - batch-1 decode tok/s (64 tokens in, 128 out) for ours and transformers;
  - 32 concurrent requests (64 in, 128 out): our continuous batching, transformers
    serving them one generate() at a time, and one padded 32-row generate().

Writes a markdown table to stdout (and to --out if given). Usage:
  python bench/cpu_bench.py [--requests 32] [--sequential-sample 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import torch


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sequential-sample", type=int, default=3,
                    help="transformers one-at-a-time: time this many requests and extrapolate to --requests")
    ap.add_argument("--out")
    args = ap.parse_args()

    import transformers

    from engine import AutoModelForCausalLM, GenerationRequest

    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained("default", dtype="float32", max_num_seqs=args.requests)
    folder = ours.name_or_path
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    vocab = ref.config.vocab_size
    n_new = args.new_tokens
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

    bandwidth = read_bandwidth_gbs()
    roofline = bandwidth * 1e9 / weight_bytes

    prompts = random_prompts(args.requests, args.prompt_len, vocab)
    one = prompts[:1]
    # Warm both up (first calls allocate and pick kernels).
    ours.generate(one, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        ref.generate(one, max_new_tokens=4, do_sample=False)

    # Decode-only batch-1 rate: time 128 new tokens minus the time for 1 (the prefill).
    def ours_b1(n):
        return timed(lambda: ours.generate(one, max_new_tokens=n, min_new_tokens=n, do_sample=False))[1]

    def ref_b1(n):
        with torch.inference_mode():
            return timed(lambda: ref.generate(one, max_new_tokens=n, min_new_tokens=n, do_sample=False))[1]

    ours_decode = (n_new - 1) / (ours_b1(n_new) - ours_b1(1))
    ref_decode = (n_new - 1) / (ref_b1(n_new) - ref_b1(1))

    # 32 concurrent requests through the continuous batch.
    engine = ours.engine

    async def concurrent():
        params = engine.resolve_params(args.prompt_len, **gen)

        async def one_request(row):
            return [o async for o in engine.generate(GenerationRequest(row.tolist(), params))]

        return await asyncio.gather(*(one_request(r) for r in prompts))

    _, ours_conc_s = timed(lambda: asyncio.run(concurrent()))
    total_tokens = args.requests * n_new
    ours_conc = total_tokens / ours_conc_s

    # transformers, one generate() at a time (extrapolated from a sample).
    sample = max(1, min(args.sequential_sample, args.requests))
    with torch.inference_mode():
        _, seq_s = timed(lambda: [ref.generate(prompts[i : i + 1], **gen) for i in range(sample)])
    ref_seq = sample * n_new / seq_s

    # transformers, one padded batch (all prompts have the same length: no padding needed).
    with torch.inference_mode():
        _, pad_s = timed(lambda: ref.generate(prompts, attention_mask=torch.ones_like(prompts), **gen))
    ref_pad = total_tokens / pad_s

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"Model: default (SmolLM2-135M-Instruct), float32, {weight_bytes / 1e6:.0f} MB of weights",
        "",
        "| measure | value |",
        "|---|---|",
        f"| read bandwidth (x.sum over 1 GiB) | {bandwidth:.1f} GB/s |",
        f"| batch-1 roofline (bandwidth / weight bytes) | {roofline:.1f} tok/s |",
        f"| batch-1 decode, ours | {ours_decode:.1f} tok/s ({ours_decode / roofline:.2f} of roofline) |",
        f"| batch-1 decode, transformers | {ref_decode:.1f} tok/s |",
        f"| batch-1 ratio ours / transformers | {ours_decode / ref_decode:.2f}x |",
        f"| {args.requests} concurrent requests, ours (continuous batching) | {ours_conc:.1f} tok/s ({ours_conc_s:.1f} s) |",
        f"| {args.requests} requests, transformers one generate() at a time | {ref_seq:.1f} tok/s (timed {sample}, extrapolated) |",
        f"| {args.requests} requests, transformers one padded {args.requests}-row generate() | {ref_pad:.1f} tok/s ({pad_s:.1f} s) |",
        f"| ratio ours / transformers one at a time | {ours_conc / ref_seq:.1f}x |",
        f"| ratio ours / transformers padded batch | {ours_conc / ref_pad:.2f}x |",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
