"""merge_outputs: what a slow stream receives when several steps piled up."""

from __future__ import annotations

from engine.outputs import FinishReason, RequestOutput, SequenceOutput, TokenLogprob, merge_outputs


def output(seqs, finished=False, completion=0, queue_time=None):
    return RequestOutput("r", tuple(seqs), finished, prompt_tokens=3, completion_tokens=completion,
                         cached_tokens=0, queue_time_s=queue_time)


def test_merge_joins_each_sequence_in_order_and_keeps_the_later_totals():
    a = output([SequenceOutput(0, (5,), "a", None, -0.5, (TokenLogprob(5, -0.5),)),
                SequenceOutput(1, (6,), "b", None, -0.1, (TokenLogprob(6, -0.1),))], completion=2, queue_time=0.25)
    b = output([SequenceOutput(1, (7, 8), "cd", FinishReason.EOS, -0.9, (TokenLogprob(7, -0.3), TokenLogprob(8, -0.5)))],
               finished=True, completion=4)
    merged = merge_outputs(a, b)
    assert merged.finished and merged.completion_tokens == 4 and merged.queue_time_s == 0.25
    first, second = merged.sequences
    assert (first.index, first.token_ids, first.text, first.finish_reason) == (0, (5,), "a", None)
    assert (second.index, second.token_ids, second.text) == (1, (6, 7, 8), "bcd")
    assert second.finish_reason is FinishReason.EOS and second.cumulative_logprob == -0.9
    assert [lp.token_id for lp in second.logprobs] == [6, 7, 8]


def test_merge_without_logprobs_keeps_none():
    a = output([SequenceOutput(0, (1,), "x")])
    b = output([SequenceOutput(0, (2,), "y")])
    assert merge_outputs(a, b).sequences[0].logprobs is None
    assert merge_outputs(a, b).sequences[0].token_ids == (1, 2)


def test_outputs_pickle_as_they_were():
    # engine/engine_process.py sends every step's outputs from its child process pickled.
    import pickle

    outputs = [
        output([SequenceOutput(0, (5, 6), "ab", FinishReason.EOS, -0.75,
                               (TokenLogprob(5, -0.5, ((5, -0.5), (9, -1.25))), TokenLogprob(6, -0.25)))],
               finished=True, completion=2, queue_time=0.125),
        RequestOutput("r2", (SequenceOutput(1, (), ""),), False, 1, 0, 0, error="the engine stopped"),
    ]
    again = pickle.loads(pickle.dumps(outputs))
    assert again == outputs
    assert type(again[0].sequences[0].finish_reason) is FinishReason
    assert type(again[0].sequences[0].logprobs[0]) is TokenLogprob
