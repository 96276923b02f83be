"""Whether a sequence is finished after a token was appended, and why."""

from __future__ import annotations

from engine.outputs import FinishReason
from engine.params import SamplingParams


def check_stop(
    token_id: int,
    num_generated: int,
    total_len: int,
    params: SamplingParams,
    max_model_len: int,
    stop_string_hit: bool,
) -> FinishReason | None:
    """token_id was just appended; num_generated and total_len (prompt + generated) count it.

    Precedence when several hold on the same token: EOS, STOP_TOKEN, STOP_STRING, LENGTH:
    what the token itself means beats running out of room.

    min_new_tokens: transformers enforces it only by masking eos logits to -inf while fewer
    than min_new_tokens tokens precede the one being chosen, so eos can first be the
    (min_new_tokens + 1)-th token. With a working mask an early eos/stop token never
    arrives and ignoring one here changes no output: this is defence in depth (and keeps
    stop_token_ids, which behave like eos, in line if a sampler masks eos only). Stop
    strings are not held back by min_new_tokens: transformers' StopStringCriteria does not
    look at it either. LENGTH always applies.
    """
    # num_generated counts this token, so "min_new_tokens tokens before it" is ">".
    token_may_stop = num_generated > params.min_new_tokens
    if token_may_stop and not params.ignore_eos and token_id in params.eos_token_ids:
        return FinishReason.EOS
    if token_may_stop and token_id in params.stop_token_ids:
        return FinishReason.STOP_TOKEN
    if stop_string_hit:
        return FinishReason.STOP_STRING
    if reaches_length(num_generated, total_len, params, max_model_len):
        return FinishReason.LENGTH
    return None


def reaches_length(num_generated: int, total_len: int, params: SamplingParams, max_model_len: int) -> bool:
    """max_new_tokens generated, or the context full: a sequence of max_model_len tokens
    fills every position, so the next token would have none."""
    return num_generated >= params.max_new_tokens or total_len >= max_model_len
