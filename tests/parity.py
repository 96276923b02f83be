"""What the engine itself answers to a request, in the clients' terms, to compare with the server."""

from __future__ import annotations

from engine import GenerationRequest

# Engine FinishReason values -> the API's names (clients.results.Sequence.finish_reason).
API_REASONS = {
    "length": "length",
    "eos": "eos_token",
    "stop_token": "stop_token",
    "stop_string": "stop_sequence",
    "aborted": "aborted",
}


def engine_sequences(server, prompt_ids, **params):
    """([{index, token_ids, text, finish_reason}], last RequestOutput) straight from the engine."""
    engine = server.engine
    request = GenerationRequest(list(prompt_ids), engine.resolve_params(len(prompt_ids), **params))
    outputs = server.engine_outputs(request)
    sequences: dict[int, dict] = {}
    for output in outputs:
        for delta in output.sequences:
            seq = sequences.setdefault(delta.index, {"index": delta.index, "token_ids": [], "text": ""})
            seq["token_ids"] += delta.token_ids
            seq["text"] += delta.text
            seq["finish_reason"] = API_REASONS[delta.finish_reason.value] if delta.finish_reason else None
            seq["cumulative_logprob"] = delta.cumulative_logprob
    return [sequences[i] for i in sorted(sequences)], outputs[-1]


def client_sequences(sequences) -> list[dict]:
    """clients.results.Sequence list -> the dicts engine_sequences returns."""
    return [
        {
            "index": s.index,
            "token_ids": s.token_ids,
            "text": s.text,
            "finish_reason": s.finish_reason,
            "cumulative_logprob": s.cumulative_logprob,
        }
        for s in sequences
    ]


def join_stream(chunks) -> list[dict]:
    """Stream chunks -> per-sequence dicts; checks that only each sequence's last chunk finishes it."""
    sequences: dict[int, dict] = {}
    for chunk in chunks:
        seq = sequences.setdefault(chunk.index, {"index": chunk.index, "token_ids": [], "text": ""})
        assert seq.get("finish_reason") is None, f"chunk after sequence {chunk.index} finished"
        assert (chunk.usage is not None) == (chunk.finish_reason is not None), "usage rides on the last chunk"
        seq["token_ids"] += chunk.token_ids
        seq["text"] += chunk.text
        seq["finish_reason"] = chunk.finish_reason
        seq["cumulative_logprob"] = chunk.cumulative_logprob
    return [sequences[i] for i in sorted(sequences)]


def same(actual: list[dict], expected: list[dict]) -> bool:
    """Tokens, text and finish reasons exactly; cumulative logprobs to float32 noise."""

    def strip(seqs):
        return [{k: v for k, v in s.items() if k != "cumulative_logprob"} for s in seqs]

    assert strip(actual) == strip(expected)
    for a, e in zip(actual, expected):
        assert abs(a["cumulative_logprob"] - e["cumulative_logprob"]) <= 1e-4 * max(1.0, abs(e["cumulative_logprob"]))
    return True
