"""Plain Python arguments -> request messages, and response messages -> dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC

from clients import results
from clients.textgen.v1 import generate_pb2, generation_config_pb2, model_info_pb2, tokenize_pb2

# GenerationConfig fields that take a plain value (transformers' names).
SCALAR_FIELDS = tuple(
    f.name
    for f in generation_config_pb2.GenerationConfig.DESCRIPTOR.fields
    if f.name not in ("early_stopping", "stop_sequences", "stop_token_ids")
)
CONFIG_FIELDS = frozenset(generation_config_pb2.GenerationConfig.DESCRIPTOR.fields_by_name)

_EARLY_STOPPING = {
    True: generation_config_pb2.EARLY_STOPPING_TRUE,
    False: generation_config_pb2.EARLY_STOPPING_FALSE,
    "never": generation_config_pb2.EARLY_STOPPING_NEVER,
}
_EARLY_STOPPING_BACK = {v: k for k, v in _EARLY_STOPPING.items()}


def finish_reason_name(value: int) -> str | None:
    """FINISH_REASON_EOS_TOKEN -> "eos_token"; UNSPECIFIED -> None."""
    if value == generate_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return generate_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def generation_config(**config) -> generation_config_pb2.GenerationConfig:
    """A GenerationConfig from keyword arguments; None values are left unset."""
    unknown = set(config) - CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown generation parameters: {', '.join(sorted(unknown))}")
    message = generation_config_pb2.GenerationConfig()
    for name, value in config.items():
        if value is None:
            continue
        if name == "early_stopping":
            message.early_stopping = _EARLY_STOPPING[value]
        elif name == "stop_sequences":
            message.stop_sequences.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            message.stop_token_ids.extend([value] if isinstance(value, int) else value)
        else:
            setattr(message, name, value)
    return message


def generate_request(
    prompt,
    *,
    request_id: str | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    return_prompt_token_ids: bool = False,
    **config,
) -> generate_pb2.GenerateRequest:
    """`prompt` is a text, a sequence of token ids, or chat messages ({"role", "content"} mappings)."""
    request = generate_pb2.GenerateRequest(
        config=generation_config(**config),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        return_prompt_token_ids=return_prompt_token_ids,
    )
    if request_id is not None:
        request.request_id = request_id
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, SequenceABC) and prompt and isinstance(prompt[0], Mapping):
        request.messages.messages.extend(generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        request.token_ids.SetInParent()  # an empty list is still a token-id prompt (and rejected as empty)
        request.token_ids.ids.extend(int(t) for t in prompt)
    return request


def _logprobs(messages) -> list[results.TokenLogprob] | None:
    if not messages:
        return None
    return [
        results.TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top_logprobs))
        for m in messages
    ]


def _usage(message: generate_pb2.Usage) -> results.Usage:
    return results.Usage(message.prompt_tokens, message.completion_tokens, message.cached_tokens)


def generation_result(response: generate_pb2.GenerateResponse) -> results.GenerationResult:
    return results.GenerationResult(
        request_id=response.request_id,
        sequences=[
            results.Sequence(
                index=s.index,
                text=s.text,
                token_ids=list(s.token_ids),
                finish_reason=finish_reason_name(s.finish_reason),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=_logprobs(s.logprobs),
            )
            for s in response.sequences
        ],
        usage=_usage(response.usage),
        prompt_token_ids=list(response.prompt_token_ids) or None,
    )


def stream_chunk(response: generate_pb2.GenerateStreamResponse) -> results.StreamChunk:
    return results.StreamChunk(
        request_id=response.request_id,
        index=response.index,
        text=response.text,
        token_ids=list(response.token_ids),
        cumulative_logprob=response.cumulative_logprob,
        finish_reason=finish_reason_name(response.finish_reason),
        usage=_usage(response.usage) if response.HasField("usage") else None,
        logprobs=_logprobs(response.logprobs),
        prompt_token_ids=list(response.prompt_token_ids) or None,
    )


def tokenize_request(text: str, return_offsets: bool) -> tokenize_pb2.TokenizeRequest:
    return tokenize_pb2.TokenizeRequest(text=text, return_offsets=return_offsets)


def tokenize_result(response: tokenize_pb2.TokenizeResponse) -> results.TokenizeResult:
    offsets = [(o.start, o.end) for o in response.offsets] if response.offsets else None
    return results.TokenizeResult(list(response.token_ids), offsets)


def config_dict(config: generation_config_pb2.GenerationConfig) -> dict:
    """The set fields of a GenerationConfig, by name."""
    values = {name: getattr(config, name) for name in SCALAR_FIELDS if config.HasField(name)}
    if config.early_stopping != generation_config_pb2.EARLY_STOPPING_UNSPECIFIED:
        values["early_stopping"] = _EARLY_STOPPING_BACK[config.early_stopping]
    values["stop_sequences"] = list(config.stop_sequences)
    values["stop_token_ids"] = list(config.stop_token_ids)
    return values


def model_info(response: model_info_pb2.GetModelInfoResponse) -> results.ModelInfo:
    return results.ModelInfo(
        model_id=response.model_id,
        architecture=response.architecture,
        dtype=response.dtype,
        fp8=response.fp8,
        max_context_length=response.max_context_length,
        vocab_size=response.vocab_size,
        eos_token_ids=list(response.eos_token_ids),
        pad_token_id=response.pad_token_id if response.HasField("pad_token_id") else None,
        default_generation_config=config_dict(response.default_generation_config),
    )
