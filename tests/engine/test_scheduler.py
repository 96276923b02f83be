"""Continuous batching, paging, preemption, prefix reuse and abort, on a fake runtime.

The fake runtime's logits depend on the token ids read back through each sequence's
block table (tests/engine/fake_runtime.py), so any paging mistake changes tokens.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import FinishReason
from engine.params import SamplingParams
from engine.runtime.base import PromptGraphLimits
from engine.sampling.beam_search import BeamSearch
from engine.sequence import Request
from engine.tokenizer import TextTokenizer
from tests.engine.fake_runtime import FakeRuntime, greedy_reference, reference_logits


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return TextTokenizer.from_folder(tiny_llama)


def make_engine(tokenizer, num_blocks=256, block_size=4, runtime=None, **config):
    runtime = runtime or FakeRuntime()
    runtime.init_kv_cache(num_blocks, block_size)
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
    return LLMEngine(runtime, tokenizer, cfg, max_model_len=4096, num_blocks=num_blocks)


class Collector:
    def __init__(self):
        self.outputs = {}

    def sink_for(self, request_id):
        def sink(output):
            self.outputs.setdefault(request_id, []).append(output)
        return sink

    def tokens(self, request_id, index=0):
        return [t for o in self.outputs[request_id] for s in o.sequences if s.index == index for t in s.token_ids]

    def final(self, request_id):
        return self.outputs[request_id][-1]


def run(engine, arrivals, max_steps=2000):
    """arrivals: [(step, request_id, prompt, params)]; returns a Collector once all finish."""
    collector = Collector()
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while (pending or engine.has_work) and step < max_steps:
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(Request(rid, list(prompt), params, collector.sink_for(rid)))
        engine.step()
        step += 1
    assert not engine.has_work, "engine did not finish"
    return collector


def greedy(n=12, **kw):
    return SamplingParams(max_new_tokens=n, do_sample=False, **kw)


def random_prompts(count, seed=0, lo=1, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def assert_all_blocks_free(engine):
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("overlap", [True, False])
def test_staggered_requests_match_each_run_alone(tokenizer, overlap):
    engine = make_engine(tokenizer, overlap_steps=overlap)
    prompts = random_prompts(8)
    prompts.append(prompts[0] + [7, 8, 9])  # shares a prefix with request 0
    arrivals = [(i * 2, f"r{i}", p, greedy(10 + i)) for i, p in enumerate(prompts)]
    got = run(engine, arrivals)
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 10 + i), f"request r{i}"
        assert got.final(f"r{i}").sequences[-1].finish_reason is FinishReason.LENGTH
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_tiny_pool_preempts_and_still_matches(tokenizer, overlap):
    engine = make_engine(tokenizer, overlap_steps=overlap, num_blocks=24, block_size=4)
    prompts = random_prompts(6, seed=1, lo=10, hi=30)
    arrivals = [(0, f"r{i}", p, greedy(20)) for i, p in enumerate(prompts)]
    got = run(engine, arrivals)
    assert engine.scheduler.preemptions_total > 0
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 20)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_chunked_prefill_of_long_prompts(tokenizer, overlap):
    engine = make_engine(tokenizer, overlap_steps=overlap, max_num_batched_tokens=7)
    prompts = random_prompts(3, seed=2, lo=25, hi=40)
    got = run(engine, [(0, f"r{i}", p, greedy(5)) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 5)


def test_repeated_prompt_hits_prefix_cache(tokenizer):
    engine = make_engine(tokenizer)
    prompt = random_prompts(1, seed=3, lo=30, hi=30)[0]
    first = run(engine, [(0, "a", prompt, greedy(6))])
    second = run(engine, [(0, "b", prompt, greedy(6))])
    assert first.final("a").cached_tokens == 0
    assert second.final("b").cached_tokens == 28  # 7 full blocks of 4; the last token is recomputed
    assert second.tokens("b") == first.tokens("a") == greedy_reference(prompt, 6)
    assert engine.scheduler.prefix_hits == 28


def test_abort_frees_every_block(tokenizer):
    engine = make_engine(tokenizer)
    collector = Collector()
    for rid, prompt in zip("abc", random_prompts(3, seed=4)):
        engine.add_request(Request(rid, prompt, greedy(100), collector.sink_for(rid)))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine._inflight is not None  # aborts land while a step's tokens are in flight
    engine.abort("b")
    assert collector.final("b").finished
    assert collector.final("b").sequences[-1].finish_reason is FinishReason.ABORTED
    engine.abort("a")
    engine.abort("c")
    engine.abort("not-there")  # unknown ids are ignored
    assert_all_blocks_free(engine)
    engine.step()  # reads the last launched step back; its requests are gone
    assert not engine.has_work and engine.block_manager.num_used_blocks == 0


def test_failed_step_fails_only_its_requests(tokenizer):
    engine = make_engine(tokenizer, runtime=FakeRuntime(fail_on_token=4242))
    good = random_prompts(1, seed=5)[0]
    got = run(engine, [(0, "bad", [5, 4242, 6], greedy(4)), (1, "good", good, greedy(4))])
    assert got.final("bad").error and "injected" in got.final("bad").error
    assert got.final("bad").sequences[-1].finish_reason is FinishReason.ERROR
    assert got.tokens("good") == greedy_reference(good, 4)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_eos_stops_a_sequence(tokenizer, overlap):
    prompt = random_prompts(1, seed=6)[0]
    ref = greedy_reference(prompt, 10)
    eos = ref[4]
    engine = make_engine(tokenizer, overlap_steps=overlap)
    got = run(engine, [(0, "a", prompt, greedy(10, eos_token_ids=(eos,)))])
    assert got.tokens("a") == ref[: ref.index(eos) + 1]
    assert got.final("a").sequences[-1].finish_reason is FinishReason.EOS
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_launches_the_next_step_before_reading_tokens_back(tokenizer, overlap):
    runtime = FakeRuntime()
    engine = make_engine(tokenizer, runtime=runtime, overlap_steps=overlap)
    collector = Collector()
    prompt = random_prompts(1, seed=12)[0]
    engine.add_request(Request("a", prompt, greedy(5), collector.sink_for("a")))
    delivered = []
    while engine.has_work:
        engine.step()
        delivered.append(len(collector.tokens("a")) if "a" in collector.outputs else 0)
    # Overlapped, step k reads back step k-1's token after launching step k; the token
    # that reaches max_new_tokens is never fed to another forward pass either way.
    assert delivered == ([0, 1, 2, 3, 4, 5] if overlap else [1, 2, 3, 4, 5])
    assert runtime.forward_calls == 5
    assert collector.tokens("a") == greedy_reference(prompt, 5)
    assert_all_blocks_free(engine)


def finish_reasons(collector, request_id):
    return sorted((s.index, s.finish_reason) for o in collector.outputs[request_id] for s in o.sequences
                  if s.finish_reason is not None)


@pytest.mark.parametrize("overlap", [True, False])
def test_final_output_only_reports_once_with_every_token(tokenizer, overlap):
    """What generate() asks for: one output per request, at the end, holding what the
    per-step outputs would have held together (tokens, logprobs, finish reasons)."""
    prompts = random_prompts(3, seed=21)
    eos = greedy_reference(prompts[1], 10)[3]
    arrivals = [(0, "a", prompts[0], greedy(9, logprobs=2)), (1, "b", prompts[1], greedy(10, eos_token_ids=(eos,))),
                (2, "c", prompts[2], SamplingParams(max_new_tokens=6, do_sample=True, num_return_sequences=2,
                                                    seed=3))]
    per_step = run(make_engine(tokenizer, overlap_steps=overlap), arrivals)
    once = make_engine(tokenizer, overlap_steps=overlap)
    final = run(once, [(t, rid, p, dataclasses.replace(params, final_output_only=True))
                       for t, rid, p, params in arrivals])
    for rid in "abc":
        assert len(final.outputs[rid]) == 1 and final.final(rid).finished
        assert len(per_step.outputs[rid]) > 1
        for index in (0, 1) if rid == "c" else (0,):
            assert final.tokens(rid, index) == per_step.tokens(rid, index)
        assert finish_reasons(final, rid) == finish_reasons(per_step, rid)
    steps_logprobs = [lp for o in per_step.outputs["a"] for s in o.sequences for lp in s.logprobs]
    assert list(final.final("a").sequences[0].logprobs) == steps_logprobs
    assert_all_blocks_free(once)


def test_detokenize_off_builds_no_text_but_keeps_stop_strings(tokenizer):
    prompt = random_prompts(1, seed=22)[0]
    with_text = run(make_engine(tokenizer), [(0, "a", prompt, greedy(8))])
    text = "".join(s.text for o in with_text.outputs["a"] for s in o.sequences)
    assert text  # the tiny tokenizer's tokens decode to something
    no_text = run(make_engine(tokenizer), [(0, "a", prompt, greedy(8, detokenize=False))])
    assert no_text.tokens("a") == with_text.tokens("a")
    assert all(s.text == "" for o in no_text.outputs["a"] for s in o.sequences)
    # Stop strings are matched on text, so they turn the detokenizer back on.
    stop = text[len(text) // 2 :][:2]
    stopped = run(make_engine(tokenizer), [(0, "a", prompt, greedy(8, detokenize=False, stop_strings=(stop,)))])
    assert stopped.final("a").sequences[-1].finish_reason is FinishReason.STOP_STRING
    assert "".join(s.text for o in stopped.outputs["a"] for s in o.sequences) == text[: text.index(stop)]


def penalized_reference(prompt, n, penalty):
    from engine.sampling.processors import repetition_penalty

    tokens = list(prompt)
    for _ in range(n):
        scores = repetition_penalty(reference_logits(tokens)[None], [tokens], [penalty])
        tokens.append(int(scores.argmax()))
    return tokens[len(prompt):]


def test_history_penalties_read_their_tokens_back_before_the_next_step(tokenizer):
    """A repetition-penalised request needs its last token on the host to sample the
    next: it shares steps with overlapped greedy requests and still matches."""
    prompts = random_prompts(4, seed=13)
    arrivals = [(i, f"g{i}", p, greedy(9)) for i, p in enumerate(prompts[:3])]
    arrivals.append((2, "p", prompts[3], greedy(9, repetition_penalty=1.5)))
    engine = make_engine(tokenizer)
    got = run(engine, arrivals)
    for i, p in enumerate(prompts[:3]):
        assert got.tokens(f"g{i}") == greedy_reference(p, 9)
    assert got.tokens("p") == penalized_reference(prompts[3], 9, 1.5)
    assert_all_blocks_free(engine)


def sampled(n, seed, **kw):
    return SamplingParams(max_new_tokens=8, do_sample=True, top_k=0, seed=seed, num_return_sequences=n, **kw)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(tokenizer):
    prompt = random_prompts(1, seed=7)[0]
    alone = run(make_engine(tokenizer), [(0, "s", prompt, sampled(3, seed=11))])
    others = [(0, f"o{i}", p, sampled(2, seed=None)) for i, p in enumerate(random_prompts(5, seed=8))]
    busy = run(make_engine(tokenizer, num_blocks=40), others + [(2, "s", prompt, sampled(3, seed=11))])
    for k in range(3):
        assert busy.tokens("s", k) == alone.tokens("s", k)
        assert len(alone.tokens("s", k)) == 8
    # The three sequences draw from distinct streams.
    assert len({tuple(alone.tokens("s", k)) for k in range(3)}) == 3


def beam_reference(prompt, params):
    """BeamSearch driven directly by the fake model's reference logits."""
    search = BeamSearch(params, prompt, params.max_new_tokens)
    beams = [[]]
    while not search.done:
        logits = torch.stack([reference_logits(prompt + b) for b in beams])
        step = search.step(logits)
        beams = [beams[p] + [t] for p, t in zip(step.parents, step.tokens)]
    return [(list(h.token_ids), float(h.score)) for h in search.finalize()]


@pytest.mark.parametrize("num_beams,nrs", [(2, 1), (4, 2)])
def test_beam_search_through_the_paged_cache(tokenizer, num_beams, nrs):
    prompts = random_prompts(3, seed=9, lo=5, hi=14)
    params = SamplingParams(max_new_tokens=9, num_beams=num_beams, num_return_sequences=nrs, do_sample=False)
    engine = make_engine(tokenizer, num_blocks=64)
    got = run(engine, [(i, f"b{i}", p, params) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        final = got.final(f"b{i}")
        expected = beam_reference(p, params)
        assert [list(s.token_ids) for s in final.sequences] == [tokens for tokens, _ in expected]
        assert [s.cumulative_logprob for s in final.sequences] == pytest.approx([score for _, score in expected])
    assert_all_blocks_free(engine)


def test_engine_raises_the_gc_threshold_and_never_lowers_it(tokenizer):
    """EngineConfig.gc_threshold: an engine raises generation 0's threshold to it (the older
    generations' stay), leaves a higher one alone, and None changes nothing."""
    import gc

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        make_engine(tokenizer, gc_threshold=10_000)
        assert gc.get_threshold() == (10_000, 11, 12)
        gc.set_threshold(50_000, 11, 12)
        make_engine(tokenizer, gc_threshold=10_000)
        assert gc.get_threshold() == (50_000, 11, 12)
        gc.set_threshold(700, 11, 12)
        make_engine(tokenizer, gc_threshold=None)
        assert gc.get_threshold() == (700, 11, 12)
    finally:
        gc.set_threshold(*saved)


def test_beam_search_ends_candidates_at_stop_strings(tokenizer):
    """A beam-search candidate whose text holds a stop string is a finished hypothesis:
    its finish reason says so and its text stops before the stop string (its tokens run
    to the one that completed it). The stop string is the end of the best beam's text at
    its ninth token, found without stop strings; a hypothesis of one token that it ended
    would score too low to be returned."""
    prompt = random_prompts(1, seed=31)[0]
    params = SamplingParams(max_new_tokens=10, num_beams=3, num_return_sequences=3)
    plain = run(make_engine(tokenizer), [(0, "a", prompt, params)]).final("a")
    stop = tokenizer.decode(list(plain.sequences[0].token_ids[:9]), skip_special_tokens=True)[-3:]
    engine = make_engine(tokenizer)
    got = run(engine, [(0, "a", prompt, dataclasses.replace(params, stop_strings=(stop,)))]).final("a")
    ended = [s for s in got.sequences if s.finish_reason is FinishReason.STOP_STRING]
    assert ended
    for s in got.sequences:
        full = tokenizer.decode(list(s.token_ids), skip_special_tokens=True)
        assert stop not in s.text and full.startswith(s.text)
        assert (stop in full) == (s.finish_reason is FinishReason.STOP_STRING)
    for s in ended:
        full = tokenizer.decode(list(s.token_ids), skip_special_tokens=True)
        assert s.text == full[: full.index(stop)]
        assert stop not in tokenizer.decode(list(s.token_ids[:-1]), skip_special_tokens=True)
    assert_all_blocks_free(engine)


class GraphPromptRuntime(FakeRuntime):
    """A FakeRuntime that says it replays one-prompt steps from graphs (as the CUDA
    runtime does) and records each step's (decode rows, prompts)."""

    prompt_graph_limits = PromptGraphLimits(max_tokens=32, max_decodes=4)

    def __init__(self):
        super().__init__()
        self.steps = []

    def execute(self, batch):
        self.steps.append((batch.num_decodes, len(batch.prefill_chunks)))
        return super().execute(batch)


def prompts_per_step(runtime):
    return [prompts for _, prompts in runtime.steps]


@pytest.mark.parametrize("overlap", [True, False])
def test_few_waiting_prompts_go_in_one_per_step(tokenizer, overlap):
    runtime = GraphPromptRuntime()
    engine = make_engine(tokenizer, runtime=runtime, overlap_steps=overlap, single_prompt_max_waiting=3)
    prompts = random_prompts(3, seed=20, lo=5, hi=30)
    got = run(engine, [(0, f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)])
    assert prompts_per_step(runtime)[:3] == [1, 1, 1]
    assert runtime.steps[1][0] == 1 and runtime.steps[2][0] == 2  # the running ones decode meanwhile
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 6)
    assert_all_blocks_free(engine)


def test_a_longer_queue_goes_in_together(tokenizer):
    runtime = GraphPromptRuntime()
    engine = make_engine(tokenizer, runtime=runtime, single_prompt_max_waiting=3)
    prompts = random_prompts(4, seed=21, lo=5, hi=30)
    got = run(engine, [(0, f"r{i}", p, greedy(4)) for i, p in enumerate(prompts)])
    assert prompts_per_step(runtime)[0] == 4
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 4)


@pytest.mark.parametrize("case", ["off", "no graphs", "long prompt", "cached prefix", "many decodes"])
def test_prompts_go_in_together_where_no_graph_step_is_won(tokenizer, case):
    runtime = GraphPromptRuntime()
    if case == "no graphs":
        runtime.prompt_graph_limits = None
    engine = make_engine(tokenizer, runtime=runtime, single_prompt_max_waiting=0 if case == "off" else 8)
    prompts = random_prompts(2, seed=22, lo=5, hi=30)
    arrivals = [(0, f"r{i}", p, greedy(4)) for i, p in enumerate(prompts)]
    if case == "long prompt":  # the first prompt is longer than any prompt graph
        prompts[0] = random_prompts(1, seed=23, lo=40, hi=40)[0]
        arrivals[0] = (0, "r0", prompts[0], greedy(4))
    if case == "cached prefix":  # 12 of the first prompt's 14 tokens are in the cache
        prompts[0] = random_prompts(1, seed=25, lo=14, hi=14)[0]
        arrivals[0] = (0, "r0", prompts[0], greedy(4))
        run(engine, [(0, "warm", prompts[0], greedy(1))])
        runtime.steps.clear()
    if case == "many decodes":  # five running streams: more decode rows than a prompt graph holds
        arrivals = [(0, f"d{i}", p, greedy(12)) for i, p in enumerate(random_prompts(5, seed=24))] + \
                   [(3, f"r{i}", p, greedy(4)) for i, p in enumerate(prompts)]
    got = run(engine, arrivals)
    first_prompt_step = next(prompts for decodes, prompts in runtime.steps if prompts and
                             (case != "many decodes" or decodes == 5))
    assert first_prompt_step == 2
    for i, p in enumerate(prompts):
        assert got.tokens(f"r{i}") == greedy_reference(p, 4)
    assert_all_blocks_free(engine)


def test_single_prompt_max_waiting_must_not_be_negative():
    with pytest.raises(ValueError, match="single_prompt_max_waiting"):
        EngineConfig(single_prompt_max_waiting=-1)
