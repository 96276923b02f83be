"""check_stop: finish reasons and their precedence, as a table."""

from __future__ import annotations

import dataclasses

import pytest

from engine.outputs import FinishReason as R
from engine.params import SamplingParams
from engine.stop import check_stop

EOS, STOP, OTHER = 2, 7, 100
BASE = SamplingParams(max_new_tokens=10, eos_token_ids=(EOS,), stop_token_ids=(STOP,))

# (case, params changes, token, num_generated, total_len, max_model_len, stop_string_hit, expected)
CASES = [
    ("ordinary token", {}, OTHER, 3, 8, 100, False, None),
    ("eos", {}, EOS, 3, 8, 100, False, R.EOS),
    ("second eos id", {"eos_token_ids": (2, 9)}, 9, 3, 8, 100, False, R.EOS),
    ("stop token", {}, STOP, 3, 8, 100, False, R.STOP_TOKEN),
    ("stop string", {}, OTHER, 3, 8, 100, True, R.STOP_STRING),
    ("max_new_tokens reached", {}, OTHER, 10, 15, 100, False, R.LENGTH),
    ("context full", {}, OTHER, 3, 100, 100, False, R.LENGTH),
    ("one position left", {}, OTHER, 3, 99, 100, False, None),
    # Precedence: what the token means beats running out of room.
    ("eos on the last allowed token", {}, EOS, 10, 15, 100, False, R.EOS),
    ("eos filling the context", {}, EOS, 3, 100, 100, False, R.EOS),
    ("token both eos and stop token", {"stop_token_ids": (EOS,)}, EOS, 3, 8, 100, False, R.EOS),
    ("eos completing a stop string", {}, EOS, 3, 8, 100, True, R.EOS),
    ("stop token completing a stop string", {}, STOP, 3, 8, 100, True, R.STOP_TOKEN),
    ("stop string on the last allowed token", {}, OTHER, 10, 15, 100, True, R.STOP_STRING),
    # ignore_eos turns off eos only.
    ("ignore_eos: eos", {"ignore_eos": True}, EOS, 3, 8, 100, False, None),
    ("ignore_eos: eos at the length limit", {"ignore_eos": True}, EOS, 10, 15, 100, False, R.LENGTH),
    ("ignore_eos: stop token", {"ignore_eos": True}, STOP, 3, 8, 100, False, R.STOP_TOKEN),
    ("ignore_eos: eos id is a stop token", {"ignore_eos": True, "stop_token_ids": (2,)}, EOS, 3, 8, 100, False,
     R.STOP_TOKEN),
    # min_new_tokens: transformers masks eos while fewer than min_new_tokens precede the
    # token being chosen, so eos may first be token number min_new_tokens + 1.
    ("eos as token min_new_tokens", {"min_new_tokens": 3}, EOS, 3, 8, 100, False, None),
    ("eos as token min_new_tokens + 1", {"min_new_tokens": 3}, EOS, 4, 9, 100, False, R.EOS),
    ("stop token before min_new_tokens", {"min_new_tokens": 3}, STOP, 2, 7, 100, False, None),
    ("stop token as token min_new_tokens + 1", {"min_new_tokens": 3}, STOP, 4, 9, 100, False, R.STOP_TOKEN),
    ("stop string before min_new_tokens", {"min_new_tokens": 3}, OTHER, 1, 6, 100, True, R.STOP_STRING),
    ("length beats min_new_tokens", {"min_new_tokens": 50}, EOS, 10, 15, 100, False, R.LENGTH),
    ("context end beats min_new_tokens", {"min_new_tokens": 5}, OTHER, 2, 100, 100, False, R.LENGTH),
]


@pytest.mark.parametrize(
    "changes, token, num_generated, total_len, max_model_len, stop_string_hit, expected",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_check_stop(changes, token, num_generated, total_len, max_model_len, stop_string_hit, expected):
    params = dataclasses.replace(BASE, **changes)
    assert check_stop(token, num_generated, total_len, params, max_model_len, stop_string_hit) is expected
