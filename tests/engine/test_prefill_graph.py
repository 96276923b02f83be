"""Which steps the CUDA runtime replays from a prefill graph (engine/runtime/cuda/prefill_graph.py)."""

import pytest
import torch

from engine.config import EngineConfig
from engine.runtime.base import ForwardBatch
from engine.runtime.cuda.prefill_graph import prefill_graph_shape

BUCKETS = [0, 1, 2, 4, 8]
LENGTHS = [16, 32, 64]


def batch(chunks, decodes=0, sampled=None):
    tokens = decodes + sum(q for _, q, _, _ in chunks)
    sampled = decodes + len(chunks) if sampled is None else sampled
    empty = torch.zeros(0, dtype=torch.int64)
    return ForwardBatch(input_ids=torch.zeros(tokens, dtype=torch.int64), positions=empty, slot_mapping=empty,
                        num_decodes=decodes, decode_block_tables=torch.zeros(decodes, 1, dtype=torch.int64),
                        decode_context_lens=torch.ones(decodes, dtype=torch.int64), prefill_chunks=chunks,
                        logits_indices=torch.arange(sampled, dtype=torch.int64))


def shape(b, window=None, buckets=BUCKETS, lengths=LENGTHS):
    return prefill_graph_shape(b, buckets, lengths, window)


def test_a_lone_fresh_prompt_takes_the_least_length_that_holds_it():
    assert shape(batch([(0, 16, 16, [0])])) == (0, 16)
    assert shape(batch([(0, 17, 17, [0])])) == (0, 32)
    assert shape(batch([(0, 1, 1, [0])])) == (0, 16)
    # The first chunk of a longer prompt samples nothing, and is fresh too.
    assert shape(batch([(0, 40, 40, [0])], sampled=0)) == (0, 64)


def test_decode_rows_beside_the_prompt_take_their_bucket():
    assert shape(batch([(3, 10, 10, [0])], decodes=3)) == (4, 16)
    assert shape(batch([(8, 64, 64, [0])], decodes=8)) == (8, 64)
    assert shape(batch([(9, 8, 8, [0])], decodes=9)) is None  # more decode rows than the largest bucket


def test_every_other_step_runs_eagerly():
    assert shape(batch([(0, 65, 65, [0])])) is None  # longer than every length
    assert shape(batch([(0, 8, 24, [0])])) is None  # after a cached prefix, or a later chunk
    assert shape(batch([(0, 8, 8, [0]), (8, 8, 8, [1])])) is None  # two prompts
    assert shape(batch([(0, 8, 8, [0])]), window=4096) is None
    assert shape(batch([(0, 8, 8, [0])]), lengths=[]) is None  # off
    assert shape(batch([], decodes=2)) is None  # a decode step has graphs of its own


def test_lengths_and_buckets_must_be_positive_integers():
    with pytest.raises(ValueError, match="prefill_graph_tokens must hold positive integers"):
        EngineConfig(prefill_graph_tokens=(16, 0))
    with pytest.raises(ValueError, match="decode_buckets must hold positive integers"):
        EngineConfig(decode_buckets=(1, 2.5))
    assert EngineConfig(prefill_graph_tokens=()).prefill_graph_tokens == ()
