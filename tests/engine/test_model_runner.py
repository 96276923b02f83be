"""build_forward_batch: the step's inputs as views into one packed tensor."""

from __future__ import annotations

import pytest
import torch

from engine.runtime.base import ForwardBatch, apply_token_feed
from engine.tokenizer import TextTokenizer
from tests.engine.fake_runtime import FakeRuntime, greedy_reference
from tests.engine.test_scheduler import greedy, make_engine, random_prompts, run

TENSOR_FIELDS = ("input_ids", "positions", "slot_mapping", "decode_block_tables", "decode_context_lens",
                 "logits_indices")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return TextTokenizer.from_folder(tiny_llama)


class RecordingRuntime(FakeRuntime):
    """Keeps, per step, each input's byte offset from the start of the packed tensor."""

    def __init__(self):
        super().__init__()
        self.offsets: list[dict[str, int]] = []

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        self.offsets.append({name: getattr(batch, name).storage_offset() * 8 for name in TENSOR_FIELDS})
        return super().execute(batch)


@pytest.mark.parametrize("overlap", [True, False])
def test_every_input_view_starts_16_byte_aligned(tokenizer, overlap):
    # Prompts of odd and even lengths arriving at different steps give parts of odd and even
    # lengths in every position of the packed tensor; Triton compiles a kernel again for
    # each new alignment of its pointers, so none may be off a 16-byte boundary.
    runtime = RecordingRuntime()
    engine = make_engine(tokenizer, runtime=runtime, overlap_steps=overlap)
    prompts = random_prompts(9, seed=3, lo=1, hi=13)
    arrivals = [(i, f"r{i}", p, greedy(5 + i % 3)) for i, p in enumerate(prompts)]
    got = run(engine, arrivals)
    for i, p in enumerate(prompts):  # the padding changed nothing the runtime reads
        assert got.tokens(f"r{i}") == greedy_reference(p, 5 + i % 3)
    odd_offsets = {name for step in runtime.offsets for name, offset in step.items() if offset % 16}
    assert not odd_offsets, f"views off a 16-byte boundary: {sorted(odd_offsets)}"
    # Without the padding some offsets would be odd multiples of 8: the test sees both kinds of parts.
    assert any(len(p) % 2 for p in prompts) and any(len(p) % 2 == 0 for p in prompts)



class FeedTakingRuntime(FakeRuntime):
    """Takes the in-flight tokens itself (fuses_token_feed), as the CUDA runtime's fill
    kernel does; counts the steps that arrived with a feed pending."""

    fuses_token_feed = True

    def __init__(self):
        super().__init__()
        self.fed_steps = 0

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        if batch.token_feed is not None:
            self.fed_steps += 1
            assert (batch.input_ids[batch.token_feed.to] == 0).all()  # not yet in
            apply_token_feed(batch)
            assert batch.token_feed is None
        return super().execute(batch)


def test_a_runtime_that_takes_the_token_feed_gets_it_deferred_and_decodes_the_same(tokenizer):
    """Overlapped steps hand a fuses_token_feed runtime the in-flight tokens as
    ForwardBatch.token_feed instead of copying them first; the tokens are the same."""
    runtime = FeedTakingRuntime()
    engine = make_engine(tokenizer, runtime=runtime, overlap_steps=True)
    prompts = random_prompts(5, seed=8, lo=2, hi=9)
    arrivals = [(i, f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)]
    got = run(engine, arrivals)
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 6)
    assert runtime.fed_steps > 0
