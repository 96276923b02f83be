"""Tensor parallelism: correctness of N ranks against one, and batch-1 decode tok/s of each.

Writes a random-weight checkpoint of the chosen shape (safetensors, one file per layer:
tensor-parallel ranks read their slices from disk), then for TP=1 (TorchRuntime) and
TP=N (TensorParallelRuntime over the same TorchRuntime code):
  - greedy decode of one sequence: the tokens, and logits compared with TP=1;
  - batch-1 decode tok/s: the runtime's forward plus argmax per token (no scheduler or
    sampler), after a prompt of --prompt tokens, over --steps tokens.
Both sides run TorchRuntime, so the ratio is the speed-up tensor parallelism gives that
runtime; the CUDA runtime (engine/runtime/cuda/) is not tensor-parallel yet.

Usage: python bench/tp_bench.py [--shape llama2-7b|tiny] [--tp 2] [--device cuda] [--dtype bfloat16]
Needs `if __name__ == "__main__"` (it is): TP workers are spawned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import loader  # noqa: E402
from engine.runtime.base import ForwardBatch  # noqa: E402

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
BLOCK = 16


def write_checkpoint(folder: Path, shape: dict, dtype: torch.dtype, device: str, std: float = 0.02) -> None:
    import json

    from safetensors.torch import save_file

    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*size):
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype).cpu()

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "rms_norm_eps": 1e-5, **shape}))
    save_file({"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h),
               "model.norm.weight": torch.ones(h, dtype=dtype)}, str(folder / "model-outer.safetensors"))
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        layer = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                 p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                 p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                 p + "mlp.down_proj.weight": rnd(h, i), p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)}
        save_file(layer, str(folder / f"model-{n:03d}.safetensors"))


def greedy(runtime, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor, float]:
    """(tokens, logits of every step [steps, vocab], decode seconds) for one sequence."""
    device = runtime.device
    blocks = list(range(-(-(len(prompt) + steps) // BLOCK)))

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    n = len(prompt)
    prefill = ForwardBatch(tensor(prompt), tensor(list(range(n))), tensor(list(range(n))), 0,
                           tensor([]).reshape(0, 0), tensor([]), [(0, n, n, blocks)], tensor([n - 1]))
    logits = [runtime.execute(prefill)[0].to(torch.float32, copy=True)]  # execute() may reuse its buffer
    tokens = [int(logits[-1].argmax())]
    table = tensor([blocks])
    start = time.perf_counter()
    for pos in range(n, n + steps - 1):
        step = ForwardBatch(tensor(tokens[-1:]), tensor([pos]), tensor([pos]), 1, table, tensor([pos + 1]), [],
                            tensor([0]))
        logits.append(runtime.execute(step)[0].to(torch.float32, copy=True))
        tokens.append(int(logits[-1].argmax()))  # a host sync per token, as in serving
    return tokens, torch.stack(logits), time.perf_counter() - start


def build(folder: Path, tp: int, dtype: torch.dtype, device: str):
    spec = loader.load_spec(folder)
    if tp == 1:
        from engine.runtime.torch_runtime import TorchRuntime

        runtime = TorchRuntime(spec, loader.load_weights(folder, dtype), dtype, torch.device(device))
    else:
        from engine.parallel.tp_runtime import TensorParallelRuntime

        runtime = TensorParallelRuntime(folder, spec, tp, dtype, torch.device(device))
    runtime.init_kv_cache(-(-spec.max_position_embeddings // BLOCK), BLOCK)
    return runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--folder", type=Path, help="reuse (or write) the checkpoint here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="tp-bench-"))
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(folder, SHAPES[args.shape], dtype, args.device)
        print(f"wrote {args.shape} checkpoint to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    prompt = torch.randint(3, SHAPES[args.shape]["vocab_size"], (args.prompt,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    results = {}
    for tp in (1, args.tp):
        runtime = build(folder, tp, dtype, args.device)
        greedy(runtime, prompt, 8)  # warm-up: allocator, kernels, NCCL communicators
        runtime.init_kv_cache(-(-runtime.spec.max_position_embeddings // BLOCK), BLOCK)
        results[tp] = greedy(runtime, prompt, args.steps)
        tokens, _, seconds = results[tp]
        print(f"TP={tp}: batch-1 decode {(len(tokens) - 1) / seconds:.1f} tok/s "
              f"({1000 * seconds / (len(tokens) - 1):.2f} ms/token) on {args.device}, {args.dtype}", flush=True)
        if hasattr(runtime, "close"):
            runtime.close()
        del runtime
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    (t1, l1, _), (tn, ln, _) = results[1], results[args.tp]
    same = next((k for k, (a, b) in enumerate(zip(t1, tn)) if a != b), None)
    print(f"greedy tokens TP={args.tp} vs TP=1: " + ("identical" if same is None else f"first differ at step {same}"))
    upto = len(t1) if same is None else same + 1  # logits compare while both saw the same tokens
    diff = (l1[:upto] - ln[:upto]).abs().max().item()
    print(f"max |logit diff| over {upto} steps: {diff:.3g} (logits magnitude {l1[:upto].abs().max().item():.3g})")


if __name__ == "__main__":
    main()
