"""resolve_sampling_params: transformers' precedence, length rules and validation."""

from __future__ import annotations

import math

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ContextLengthError, InvalidParameterError
from engine.generation_config import resolve_sampling_params


def resolve(defaults=None, generation_config=None, prompt_len=10, max_model_len=1000, **overrides):
    return resolve_sampling_params(
        defaults or {}, generation_config, prompt_len=prompt_len, max_model_len=max_model_len, **overrides
    )


# ---- defaults and precedence ---------------------------------------------------------------


def test_transformers_defaults_when_nothing_is_set():
    p = resolve(do_sample=True)
    assert (p.max_new_tokens, p.min_new_tokens) == (20, 0)
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 50, 1.0, None)
    assert (p.num_beams, p.num_return_sequences, p.length_penalty, p.early_stopping) == (1, 1, 1.0, False)
    assert (p.repetition_penalty, p.no_repeat_ngram_size) == (1.0, 0)
    assert resolve().do_sample is False


def test_overrides_beat_generation_config_beat_defaults():
    defaults = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "transformers_version": "x"}
    gc = transformers.GenerationConfig(temperature=0.8, top_k=5)
    p = resolve(defaults, gc, top_k=7)
    assert p.do_sample is True  # from defaults
    assert p.top_p == 0.9  # from defaults: the GenerationConfig leaves it unset
    assert p.temperature == 0.8  # the GenerationConfig beats defaults
    assert p.top_k == 7  # an override beats both


def test_none_override_means_not_given():
    p = resolve({"do_sample": True, "temperature": 0.6}, temperature=None, seed=None)
    assert p.temperature == 0.6 and p.seed is None


def test_generation_config_as_dict_and_unknown_default_keys_ignored():
    defaults = {"bos_token_id": 1, "typical_p": 0.5, "_from_model_config": True, "eos_token_id": 2}
    p = resolve(defaults, {"max_new_tokens": 5})
    assert p.max_new_tokens == 5 and p.eos_token_ids == (2,)


def test_greedy_ignores_sampling_knobs_even_invalid_ones():
    # transformers only warns about these when do_sample is False.
    p = resolve(temperature=0.0, top_p=7.0, top_k=3, min_p=2.0)
    assert not p.do_sample
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 50, 1.0, None)
    assert resolve({"do_sample": True, "temperature": 0.7}, do_sample=False).temperature == 1.0


# ---- lengths --------------------------------------------------------------------------------


def test_max_length_counts_the_prompt():
    assert resolve({"max_length": 30}, prompt_len=10).max_new_tokens == 20
    assert resolve(max_length=12, prompt_len=10).max_new_tokens == 2


def test_max_new_tokens_wins_over_max_length_from_any_source():
    assert resolve({"max_length": 30}, max_new_tokens=5).max_new_tokens == 5
    # As transformers: a model default max_new_tokens beats a caller's max_length.
    assert resolve({"max_new_tokens": 7}, max_length=100).max_new_tokens == 7


def test_max_length_not_above_prompt_is_an_error():
    with pytest.raises(InvalidParameterError) as e:
        resolve(max_length=10, prompt_len=10)
    assert e.value.field == "max_length"


def test_max_new_tokens_is_clamped_to_the_context():
    assert resolve(max_new_tokens=10**12, prompt_len=10, max_model_len=64).max_new_tokens == 54
    assert resolve(prompt_len=60, max_model_len=64).max_new_tokens == 4  # default 20, clamped


def test_min_length_and_min_new_tokens():
    assert resolve(min_length=15, prompt_len=10).min_new_tokens == 5
    assert resolve(min_length=5, prompt_len=10).min_new_tokens == 0
    assert resolve({"min_length": 50}, min_new_tokens=3).min_new_tokens == 3


def test_prompt_checks():
    with pytest.raises(InvalidParameterError) as e:
        resolve(prompt_len=0)
    assert e.value.field == "input_ids"
    with pytest.raises(ContextLengthError) as e:
        resolve(prompt_len=64, max_model_len=64)
    assert e.value.field == "input_ids" and "64" in str(e.value)


# ---- special tokens ----------------------------------------------------------------------------


def test_eos_int_or_list_and_pad_fallback():
    p = resolve({"eos_token_id": [5, 7, 5]})
    assert p.eos_token_ids == (5, 7) and p.pad_token_id == 5
    p = resolve({"eos_token_id": 5, "pad_token_id": 0})
    assert p.eos_token_ids == (5,) and p.pad_token_id == 0
    assert resolve({"eos_token_id": 3}, eos_token_id=[9]).eos_token_ids == (9,)
    assert resolve().pad_token_id is None


def test_engine_extras():
    p = resolve(stop_strings="END", stop_token_ids=[4], ignore_eos=True, logprobs=3, seed=42)
    assert p.stop_strings == ("END",) and p.stop_token_ids == (4,)
    assert p.ignore_eos and p.logprobs == 3 and p.seed == 42


def test_valid_beam_and_sampling_settings():
    p = resolve(num_beams=4, num_return_sequences=4, length_penalty=-2.0, early_stopping="never")
    assert (p.num_beams, p.num_return_sequences, p.early_stopping) == (4, 4, "never")
    assert resolve(do_sample=True, num_return_sequences=3).num_return_sequences == 3
    assert resolve(do_sample=True, top_k=0, top_p=1.0, min_p=0.0, temperature=2).temperature == 2.0


# ---- invalid values ----------------------------------------------------------------------------

S = {"do_sample": True}
INVALID = [
    (dict(S, temperature=0.0), "temperature"),
    (dict(S, temperature=-1.0), "temperature"),
    (dict(S, temperature=math.nan), "temperature"),
    (dict(S, temperature=math.inf), "temperature"),
    (dict(S, top_p=0.0), "top_p"),
    (dict(S, top_p=1.5), "top_p"),
    (dict(S, top_p=math.nan), "top_p"),
    (dict(S, top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(S, min_p=-0.1), "min_p"),
    (dict(S, min_p=1.5), "min_p"),
    (dict(S, min_p=math.nan), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),  # greedy
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=10.0), "max_new_tokens"),
    (dict(max_new_tokens="10"), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(min_length=-1), "min_length"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[2, -3]), "eos_token_id"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), "stop_token_ids"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(stop_strings=[3]), "stop_strings"),
    (dict(stop_strings=5), "stop_strings"),
    (dict(stop_strings=["x"] * 65), "stop_strings"),
    (dict(do_sample=1), "do_sample"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(temperature="hot"), "temperature"),
    (dict(pad_token_id=True), "pad_token_id"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(typical_p=0.5), "typical_p"),  # a transformers name we do not support
    (dict(temprature=0.5), "temprature"),
]


@pytest.mark.parametrize("kwargs,field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as e:
        resolve(**kwargs)
    assert e.value.field == field


def test_invalid_default_is_reported_too():
    with pytest.raises(InvalidParameterError) as e:
        resolve({"do_sample": True, "top_p": 0.0})
    assert e.value.field == "top_p"


# ---- arbitrary input never escapes as another exception ----------------------------------------

_NAMES = [
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty",
    "early_stopping", "num_return_sequences", "eos_token_id", "pad_token_id", "stop_strings", "seed",
    "stop_token_ids", "ignore_eos", "logprobs", "bogus",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.sampled_from(["never", 0, 1, 2, 0.5, 1.0]),
)
_VALUES = st.one_of(
    _SCALARS, st.lists(_SCALARS, max_size=4), st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(
    kwargs=st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=6),
    defaults=st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=3),
    prompt_len=st.integers(min_value=0, max_value=70),
    max_model_len=st.integers(min_value=2, max_value=64),
)
def test_arbitrary_kwargs_raise_only_invalid_parameter(kwargs, defaults, prompt_len, max_model_len):
    try:
        p = resolve(defaults, prompt_len=prompt_len, max_model_len=max_model_len, **kwargs)
    except InvalidParameterError as e:
        assert e.field
        return
    assert 1 <= p.max_new_tokens <= max_model_len - prompt_len
    assert p.num_return_sequences >= 1 and p.num_beams >= 1
