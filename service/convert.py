"""Every conversion between protobuf messages and engine types, in one place.

From protobuf: a GenerateRequest becomes the engine's GenerationRequest (prompt ids
plus SamplingParams resolved by the engine). To protobuf: RequestOutput deltas become
a GenerateResponse or GenerateStreamResponses, ModelInfo a GetModelInfoResponse.
"""

from __future__ import annotations

from clients.textgen.v1 import generate_pb2, generation_config_pb2, model_info_pb2, tokenize_pb2
from engine.errors import InvalidParameterError
from engine.outputs import FinishReason, RequestOutput, SequenceOutput, TokenLogprob
from engine.params import GenerationRequest, SamplingParams

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# GenerationConfig fields that map one to one onto resolve_params' keyword arguments.
_SCALAR_FIELDS = (
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty",
    "num_return_sequences", "seed", "ignore_eos",
)  # fmt: skip

_EARLY_STOPPING_FROM_PB = {
    generation_config_pb2.EARLY_STOPPING_TRUE: True,
    generation_config_pb2.EARLY_STOPPING_FALSE: False,
    generation_config_pb2.EARLY_STOPPING_NEVER: "never",
}
_EARLY_STOPPING_TO_PB = {value: key for key, value in _EARLY_STOPPING_FROM_PB.items()}

_FINISH_REASON_TO_PB = {
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generate_pb2.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_TOKEN: generate_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: generate_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.ABORTED: generate_pb2.FINISH_REASON_ABORTED,
}

# Engine field names (transformers') that the API spells differently, as request paths.
_API_FIELD_PATHS = {
    "input_ids": "input",
    "token_ids": "token_ids.ids",
    "stop_strings": "config.stop_sequences",
    "logprobs": "top_logprobs",
}
_REQUEST_FIELDS = {"input", "text", "messages", "request_id", "top_logprobs"}


def api_field_path(engine_field: str) -> str:
    """Where an engine parameter sits in a GenerateRequest, e.g. "config.temperature"."""
    if engine_field in _API_FIELD_PATHS:
        return _API_FIELD_PATHS[engine_field]
    if engine_field.split(".")[0].split("[")[0] in _REQUEST_FIELDS:
        return engine_field
    return f"config.{engine_field}"


# ---- from protobuf ---------------------------------------------------------------------


def generation_overrides(config: generation_config_pb2.GenerationConfig) -> dict:
    """The fields a client set, by transformers' names; unset ones keep the model's defaults."""
    overrides = {name: getattr(config, name) for name in _SCALAR_FIELDS if config.HasField(name)}
    if config.early_stopping != generation_config_pb2.EARLY_STOPPING_UNSPECIFIED:
        if config.early_stopping not in _EARLY_STOPPING_FROM_PB:  # proto3 enums are open: any int32 arrives
            raise InvalidParameterError("early_stopping", f"unknown value {config.early_stopping}")
        overrides["early_stopping"] = _EARLY_STOPPING_FROM_PB[config.early_stopping]
    if config.stop_sequences:
        overrides["stop_strings"] = tuple(config.stop_sequences)
    if config.stop_token_ids:
        overrides["stop_token_ids"] = tuple(config.stop_token_ids)
    return overrides


# Prompts with more characters than this are tokenized on a worker thread, so that the
# event loop serves other calls meanwhile (2 MB of text took 1.4 s to tokenize on the CPU
# VM: bench/cpu_probes.py, docs/benchmarks.md).
OFF_LOOP_CHARS = 1 << 16


def long_input(request: generate_pb2.GenerateRequest) -> bool:
    """Whether the request's text (or its chat messages together) exceeds OFF_LOOP_CHARS."""
    kind = request.WhichOneof("input")
    if kind == "text":
        return len(request.text) > OFF_LOOP_CHARS
    if kind == "messages":
        return sum(len(m.content) for m in request.messages.messages) > OFF_LOOP_CHARS
    return False


def prompt_token_ids(request: generate_pb2.GenerateRequest, tokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind == "text":
        return tokenizer.encode(request.text)
    if kind == "token_ids":
        return list(request.token_ids.ids)
    if kind == "messages":
        turns = []
        for i, message in enumerate(request.messages.messages):
            if message.role not in CHAT_ROLES:
                allowed = ", ".join(sorted(CHAT_ROLES))
                raise InvalidParameterError(f"messages[{i}].role", f"unknown role {message.role!r}; use {allowed}")
            turns.append({"role": message.role, "content": message.content})
        # The rendered template already holds its special tokens, as in transformers.
        return tokenizer.encode(tokenizer.apply_chat_template(turns), add_special_tokens=False)
    raise InvalidParameterError("input", "set one of text, token_ids or messages")


def generation_request(request: generate_pb2.GenerateRequest, engine, request_id: str,
                       ids: list[int] | None = None) -> GenerationRequest:
    """ids: the prompt's token ids when already computed (see long_input)."""
    if ids is None:
        ids = prompt_token_ids(request, engine.tokenizer)
    overrides = generation_overrides(request.config)
    if request.logprobs or request.top_logprobs:
        overrides["logprobs"] = request.top_logprobs
    params = engine.resolve_params(len(ids), **overrides)
    return GenerationRequest(prompt_token_ids=ids, params=params, request_id=request_id)


# ---- to protobuf -----------------------------------------------------------------------


def finish_reason_to_pb(reason: FinishReason | None) -> int:
    if reason is None:
        return generate_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASON_TO_PB[reason]


def _logprobs_to_pb(logprobs: tuple[TokenLogprob, ...] | None) -> list[generate_pb2.TokenLogprob]:
    return [
        generate_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[generate_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def usage_to_pb(output: RequestOutput) -> generate_pb2.Usage:
    return generate_pb2.Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        cached_tokens=output.cached_tokens,
    )


def generate_response_to_pb(
    request: GenerationRequest, outputs: list[RequestOutput], return_prompt: bool
) -> generate_pb2.GenerateResponse:
    """Join every step's deltas into whole sequences (beams arrive whole, once)."""
    sequences: dict[int, generate_pb2.Sequence] = {}
    for output in outputs:
        for delta in output.sequences:
            seq = sequences.setdefault(delta.index, generate_pb2.Sequence(index=delta.index))
            seq.text += delta.text
            seq.token_ids.extend(delta.token_ids)
            seq.logprobs.extend(_logprobs_to_pb(delta.logprobs))
            seq.cumulative_logprob = delta.cumulative_logprob
            seq.finish_reason = finish_reason_to_pb(delta.finish_reason)
    return generate_pb2.GenerateResponse(
        request_id=request.request_id,
        sequences=[sequences[i] for i in sorted(sequences)],
        usage=usage_to_pb(outputs[-1]),
        prompt_token_ids=request.prompt_token_ids if return_prompt else (),
    )


def stream_response_to_pb(
    request: GenerationRequest, output: RequestOutput, delta: SequenceOutput, first: bool, return_prompt: bool
) -> generate_pb2.GenerateStreamResponse:
    """One sequence's delta; `first` marks the sequence's first message (which carries the prompt)."""
    message = generate_pb2.GenerateStreamResponse(
        request_id=request.request_id,
        index=delta.index,
        token_ids=delta.token_ids,
        text=delta.text,
        finish_reason=finish_reason_to_pb(delta.finish_reason),
        logprobs=_logprobs_to_pb(delta.logprobs),
        cumulative_logprob=delta.cumulative_logprob,
        prompt_token_ids=request.prompt_token_ids if first and return_prompt else (),
    )
    if delta.finish_reason is not None:
        message.usage.CopyFrom(usage_to_pb(output))
    return message


def tokenize_response_to_pb(token_ids, offsets) -> tokenize_pb2.TokenizeResponse:
    return tokenize_pb2.TokenizeResponse(
        token_ids=token_ids,
        offsets=[tokenize_pb2.TokenOffset(start=s, end=e) for s, e in offsets or ()],
    )


def generation_config_to_pb(params: SamplingParams) -> generation_config_pb2.GenerationConfig:
    config = generation_config_pb2.GenerationConfig(
        early_stopping=_EARLY_STOPPING_TO_PB[params.early_stopping],
        stop_sequences=params.stop_strings,
        stop_token_ids=params.stop_token_ids,
    )
    for name in _SCALAR_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(config, name, value)
    return config


def model_info_to_pb(info) -> model_info_pb2.GetModelInfoResponse:
    """`info` is the engine's ModelInfo."""
    response = model_info_pb2.GetModelInfoResponse(
        model_id=info.model_id,
        architecture=info.architecture,
        dtype=info.dtype,
        fp8=info.fp8,
        max_context_length=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        default_generation_config=generation_config_to_pb(info.default_params),
    )
    if info.default_params.pad_token_id is not None:
        response.pad_token_id = info.default_params.pad_token_id
    return response
