"""Plain results of the clients: dataclasses with no protobuf in them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # (token_id, logprob) of the most likely alternatives, best first.
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sequence:
    index: int
    text: str
    token_ids: list[int]
    # "length", "eos_token", "stop_sequence", "stop_token" or "aborted".
    finish_reason: str
    cumulative_logprob: float
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    sequences: list[Sequence]
    usage: Usage
    prompt_token_ids: list[int] | None = None

    @property
    def text(self) -> str:
        """The first sequence's text (the only one unless several were asked for)."""
        return self.sequences[0].text


@dataclass(frozen=True)
class StreamChunk:
    """What one sequence gained in one step."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    # Set on the sequence's last chunk only.
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    # (start, end) character offsets per token, when asked for.
    offsets: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str
    dtype: str
    fp8: bool
    max_context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    # GenerationConfig defaults by transformers' names (early_stopping: True, False or "never").
    default_generation_config: dict = field(default_factory=dict)
