"""The engine's own Python per step, without a model: what the host spends scheduling,
building batches, sampling and updating requests, on any machine (no GPU needed).

The runtime returns zero logits over a small vocabulary at once, so every microsecond
measured is the engine's (plus a [rows, 512] float sampling on the CPU). Requests are the
offline bench's: N prompts of 128 random tokens, exactly 128 new tokens, greedy, token
ids only (as generate() asks), all submitted at once.

Usage: python bench/host_bench.py [--seqs 256,512] [--requests 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_bench  # noqa: E402  (the offline run, prompts and stage timers are shared with it)

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.runtime.base import ModelRuntime, ModelSpec  # noqa: E402

VOCAB = 512
SPEC = ModelSpec(architecture="llama", vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=1, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
                 max_position_embeddings=4096, tie_word_embeddings=True)


class ZeroLogitsRuntime(ModelRuntime):
    spec = SPEC
    device = torch.device("cpu")
    dtype = torch.float32

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        pass

    def copy_blocks(self, pairs) -> None:
        pass

    def execute(self, batch):
        return torch.zeros(batch.logits_indices.shape[0], VOCAB)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="256,512", help="max_num_seqs values, comma-separated")
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    gpu_bench.sync = lambda: None  # nothing runs on a device here
    prompts = gpu_bench.prompts_for(args.requests, 128, VOCAB)
    for seqs in (int(s) for s in args.seqs.split(",")):
        config = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=8192)
        engine = LLMEngine(ZeroLogitsRuntime(), gpu_bench.StubTokenizer(), config, 4096, 20000)
        gpu_bench.run_offline(engine, prompts, 128, 4096)  # warm-up
        steps = engine.steps_total
        start = time.perf_counter()
        gpu_bench.run_offline(engine, prompts, 128, 4096)
        elapsed = time.perf_counter() - start
        steps = engine.steps_total - steps
        print(f"max_num_seqs {seqs}: {elapsed / steps * 1e3:.2f} ms per step over {steps} steps")
        gpu_bench.say = print
        gpu_bench.profile_steps(engine, prompts, 128, 4096)


if __name__ == "__main__":
    main()
