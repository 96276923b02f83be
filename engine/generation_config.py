"""Build one request's `SamplingParams` the way transformers' `generate()` would.

Precedence, lowest first (transformers' `_prepare_generation_config`):
transformers' global defaults < the model's generation_config.json (`defaults`)
< the set (non-None) values of a `GenerationConfig` < keyword overrides.

Length rules follow `_prepare_generated_length`: `max_new_tokens` from any
source wins over `max_length`; `max_length` counts the prompt; when nobody sets
either, 20 new tokens. `min_new_tokens` likewise wins over `min_length`.

Validation mirrors transformers where it raises and stays quiet where it only
warns: sampling knobs (temperature, top_k, top_p, min_p) are range-checked only
when sampling and are reset to their neutral defaults otherwise, so that greedy
requests carrying e.g. temperature=0 (an OpenAI-style "greedy") are accepted.
Types are always checked: every error is an `InvalidParameterError` naming the
field, never a TypeError from deeper in the engine.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

from engine.errors import ContextLengthError, InvalidParameterError
from engine.params import SamplingParams

# transformers 5.17 `GenerationConfig._get_default_generation_params()`, restricted
# to what we support. `max_length` is handled apart (see `_resolve_lengths`).
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}
DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default max_length of 20, counted as new tokens
MAX_STOP_STRINGS = 64
# Alternatives per token a request may ask for; as vLLM's default cap (OpenAI allows 20).
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1

_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")

# ---- per-field type checks -------------------------------------------------------------


def _int(field: str, v: Any) -> int:
    # bool is an int subclass; True as a token id or a count is a client bug, not a 1.
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InvalidParameterError(field, f"must be an integer, got {v!r}")
    return int(v)


def _float(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InvalidParameterError(field, f"must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int beyond float range
        raise InvalidParameterError(field, f"must be a finite number, got {v!r}") from None


def _bool(field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidParameterError(field, f"must be true or false, got {v!r}")
    return v


def _early_stopping(field: str, v: Any) -> bool | str:
    if isinstance(v, bool) or (isinstance(v, str) and v == "never"):
        return v
    raise InvalidParameterError(field, f'must be true, false or "never", got {v!r}')


def _token_ids(field: str, v: Any) -> tuple[int, ...]:
    """An int or a list of ints, each >= 0; duplicates dropped (order kept)."""
    items = [v] if not isinstance(v, (list, tuple)) else list(v)
    ids: dict[int, None] = {}  # an ordered set
    for item in items:
        token = _int(field, item)
        if token < 0:
            raise InvalidParameterError(field, f"token ids must be >= 0, got {token}")
        ids[token] = None
    return tuple(ids)


def _stop_strings(field: str, v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise InvalidParameterError(field, f"must be a string or a list of strings, got {v!r}")
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidParameterError(field, f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    for s in items:
        if not isinstance(s, str):
            raise InvalidParameterError(field, f"stop strings must be strings, got {s!r}")
        if not s:
            raise InvalidParameterError(field, "stop strings must not be empty")
    return tuple(items)


# Every name a caller may set, with its type check. Keys are transformers' kwarg
# names, plus the engine's own stop_token_ids, ignore_eos, logprobs and seed.
_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _int,
    "max_length": _int,
    "min_new_tokens": _int,
    "min_length": _int,
    "do_sample": _bool,
    "temperature": _float,
    "top_k": _int,
    "top_p": _float,
    "min_p": _float,
    "repetition_penalty": _float,
    "no_repeat_ngram_size": _int,
    "num_beams": _int,
    "length_penalty": _float,
    "early_stopping": _early_stopping,
    "num_return_sequences": _int,
    "eos_token_id": _token_ids,
    "pad_token_id": _int,
    "stop_strings": _stop_strings,
    "seed": _int,
    "stop_token_ids": _token_ids,
    "ignore_eos": _bool,
    "logprobs": _int,
}


def _known_values(source: Mapping[str, Any] | None) -> dict[str, Any]:
    """The supported, set (non-None) entries of a defaults-like mapping.

    Other keys of a generation_config.json (bos_token_id, transformers_version,
    typical_p, ...) are not the caller's doing, so they are skipped, not rejected.
    """
    if not source:
        return {}
    return {k: v for k, v in source.items() if k in _FIELDS and v is not None}


def _generation_config_values(generation_config: Any) -> dict[str, Any]:
    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return _known_values(generation_config)
    # A transformers GenerationConfig (duck-typed): unset attributes are None in 5.x.
    return _known_values(generation_config.to_dict())


def resolve_sampling_params(
    defaults: Mapping[str, Any] | None,
    generation_config: Any = None,
    *,
    prompt_len: int,
    max_model_len: int,
    **overrides: Any,
) -> SamplingParams:
    """Merge defaults, a GenerationConfig and overrides into validated SamplingParams.

    Raises InvalidParameterError (field = transformers' name) for a bad value or
    an unknown override, ContextLengthError when the prompt does not fit.
    """
    for name in overrides:
        if name not in _FIELDS:
            raise InvalidParameterError(name, "unknown generation parameter")
    if prompt_len <= 0:
        raise InvalidParameterError("input_ids", "the prompt is empty; at least one token is needed")
    if prompt_len >= max_model_len:
        raise ContextLengthError(
            "input_ids",
            f"the prompt has {prompt_len} tokens but the model's context is {max_model_len}; "
            "at least one token must be left to generate",
        )

    # None means "not given" at every level, as an unset GenerationConfig attribute does.
    raw = {**_known_values(defaults), **_generation_config_values(generation_config)}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    v = {name: _FIELDS[name](name, value) for name, value in raw.items()}
    for name, value in TRANSFORMERS_DEFAULTS.items():
        v.setdefault(name, value)

    max_new_tokens, min_new_tokens = _resolve_lengths(v, prompt_len, max_model_len)
    do_sample = v["do_sample"]
    num_beams = v["num_beams"]
    _check_ranges(v, do_sample, num_beams)

    eos = v.get("eos_token_id", ())
    pad = v.get("pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # transformers' `_prepare_special_tokens` fallback
    if not do_sample:
        # Ignored by transformers' greedy and beam search; keep params canonical.
        for name in _SAMPLING_ONLY:
            v.pop(name, None)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=v.get("temperature", 1.0),
        top_k=v.get("top_k", 50),
        top_p=v.get("top_p", 1.0),
        min_p=v.get("min_p"),
        repetition_penalty=v["repetition_penalty"],
        no_repeat_ngram_size=v["no_repeat_ngram_size"],
        num_beams=num_beams,
        length_penalty=v["length_penalty"],
        early_stopping=v["early_stopping"],
        num_return_sequences=v["num_return_sequences"],
        eos_token_ids=eos,
        pad_token_id=pad,
        stop_token_ids=v.get("stop_token_ids", ()),
        stop_strings=v.get("stop_strings", ()),
        seed=v.get("seed"),
        ignore_eos=v.get("ignore_eos", False),
        logprobs=v.get("logprobs"),
    )


def _resolve_lengths(v: dict[str, Any], prompt_len: int, max_model_len: int) -> tuple[int, int]:
    room = max_model_len - prompt_len
    if "max_new_tokens" in v:
        if v["max_new_tokens"] < 1:
            raise InvalidParameterError("max_new_tokens", f"must be >= 1, got {v['max_new_tokens']}")
        max_new = v["max_new_tokens"]
    elif "max_length" in v:
        # An explicit max_length counts the prompt; transformers raises when nothing is left.
        if v["max_length"] <= prompt_len:
            raise InvalidParameterError(
                "max_length",
                f"is {v['max_length']} but the prompt already has {prompt_len} tokens "
                "(max_length counts the prompt); set max_new_tokens instead",
            )
        max_new = v["max_length"] - prompt_len
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    # The engine cannot go past the context end (transformers clamps its default likewise).
    max_new = min(max_new, room)

    if "min_new_tokens" in v:
        if v["min_new_tokens"] < 0:
            raise InvalidParameterError("min_new_tokens", f"must be >= 0, got {v['min_new_tokens']}")
        min_new = v["min_new_tokens"]
    else:
        if v["min_length"] < 0:
            raise InvalidParameterError("min_length", f"must be >= 0, got {v['min_length']}")
        min_new = max(0, v["min_length"] - prompt_len)
    return max_new, min_new


def _finite(field: str, x: float) -> None:
    if not math.isfinite(x):
        raise InvalidParameterError(field, f"must be a finite number, got {x}")


def _check_ranges(v: dict[str, Any], do_sample: bool, num_beams: int) -> None:
    if do_sample:
        _finite("temperature", v["temperature"])
        if v["temperature"] <= 0:
            raise InvalidParameterError(
                "temperature", f"must be > 0 when sampling, got {v['temperature']} (for greedy, set do_sample=false)"
            )
        if v["top_k"] < 0:
            raise InvalidParameterError("top_k", f"must be >= 0 (0 disables it), got {v['top_k']}")
        if not 0.0 < v["top_p"] <= 1.0:  # also false for NaN
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {v['top_p']}")
        if "min_p" in v and not 0.0 <= v["min_p"] <= 1.0:
            raise InvalidParameterError("min_p", f"must be in [0, 1], got {v['min_p']}")

    penalty = v["repetition_penalty"]
    if not (penalty > 0 and math.isfinite(penalty)):
        raise InvalidParameterError("repetition_penalty", f"must be a finite number > 0, got {penalty}")
    if v["no_repeat_ngram_size"] < 0:
        raise InvalidParameterError("no_repeat_ngram_size", f"must be >= 0, got {v['no_repeat_ngram_size']}")
    if num_beams < 1:
        raise InvalidParameterError("num_beams", f"must be >= 1, got {num_beams}")
    if num_beams > 1:
        _finite("length_penalty", v["length_penalty"])

    n = v["num_return_sequences"]
    if n < 1:
        raise InvalidParameterError("num_return_sequences", f"must be >= 1, got {n}")
    if n > 1 and num_beams == 1 and not do_sample:
        raise InvalidParameterError(
            "num_return_sequences", f"greedy decoding returns one sequence, got {n}; set do_sample or num_beams"
        )
    if num_beams > 1 and n > num_beams:
        raise InvalidParameterError("num_return_sequences", f"must be <= num_beams ({num_beams}), got {n}")

    if "seed" in v and not 0 <= v["seed"] <= MAX_SEED:
        raise InvalidParameterError("seed", f"must be in [0, 2**63 - 1], got {v['seed']}")
    if "logprobs" in v and not 0 <= v["logprobs"] <= MAX_LOGPROBS:
        raise InvalidParameterError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {v['logprobs']}")
