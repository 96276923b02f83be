"""A ModelRuntime whose 'KV cache' stores token ids, for testing paging logic exactly.

Each slot holds the token id written there. A sequence's logits are a pseudo-random
function of the token ids it reads back through its block table, so any mistake in
slot mapping, block tables, copy-on-write, prefix reuse or preemption changes the
tokens produced. `reference_logits(tokens)` is the same function of the true tokens.
"""

from __future__ import annotations

import torch

from engine.runtime.base import ForwardBatch, ModelRuntime, ModelSpec

VOCAB = 49152

SPEC = ModelSpec(
    architecture="llama", vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
    max_position_embeddings=4096, tie_word_embeddings=True,
)


def reference_logits(tokens: list[int]) -> torch.Tensor:
    seed = hash(tuple(tokens)) & (2**62 - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=g) * 3.0


class FakeRuntime(ModelRuntime):
    spec = SPEC
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, fail_on_token: int | None = None):
        self.fail_on_token = fail_on_token  # raise when this token id is in a batch
        self.slots: torch.Tensor | None = None
        self.block_size = 0
        self.forward_calls = 0

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size * 8

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots = torch.full((num_blocks * block_size,), -1, dtype=torch.long)

    def copy_blocks(self, pairs):
        bs = self.block_size
        for src, dst in pairs:
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]

    def _read(self, table: list[int], length: int) -> list[int]:
        bs = self.block_size
        return [int(self.slots[table[p // bs] * bs + p % bs]) for p in range(length)]

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        self.forward_calls += 1
        if self.fail_on_token is not None and (batch.input_ids == self.fail_on_token).any():
            raise RuntimeError("injected model failure")
        self.slots[batch.slot_mapping] = batch.input_ids
        last_token_rows = {}
        for i in range(batch.num_decodes):
            table = batch.decode_block_tables[i].tolist()
            last_token_rows[i] = self._read(table, int(batch.decode_context_lens[i]))
        for start, qlen, ctx, table in batch.prefill_chunks:
            last_token_rows[start + qlen - 1] = self._read(table, ctx)
        rows = [reference_logits(last_token_rows[int(i)]) for i in batch.logits_indices]
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def greedy_reference(prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(reference_logits(tokens).argmax()))
        if tokens[-1] in eos:
            break
    return tokens[len(prompt):]
