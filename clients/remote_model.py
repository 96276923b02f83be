"""RemoteModelForCausalLM: engine.AutoModelForCausalLM's generate() over gRPC.

Tensors in, tensors out, as in process: each row of input_ids (left padding stripped
by attention_mask) becomes one request, all rows are sent at once, and the output is
each original row followed by its generated tokens, right-padded with the model's
pad token to the longest, one row per returned sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from clients.async_client import AsyncTextGenerationClient
from clients.channel import default_target
from clients.convert import CONFIG_FIELDS
from clients.results import GenerationResult, ModelInfo, Sequence, StreamChunk
from clients.sync_client import TextGenerationClient

# generate() keywords of transformers that change nothing for a remote model.
_IGNORED_KWARGS = {"use_cache", "tokenizer", "output_scores", "synced_gpus"}
# transformers' names the API spells differently.
_RENAMED = {"stop_strings": "stop_sequences"}


@dataclass
class RemoteGenerateOutput:
    """transformers' output for return_dict_in_generate=True (the fields we fill)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None

    def __getitem__(self, key):
        return getattr(self, key)


# Connection keywords: TLS and bearer token, as TextGenerationClient takes them.
_SECURITY_KWARGS = ("tls", "tls_ca", "tls_cert", "tls_key", "token")


class RemoteModelForCausalLM:
    def __init__(self, target: str | None = None, *, timeout: float | None = None, **security):
        """security: tls, tls_ca, tls_cert, tls_key, token (see TextGenerationClient)."""
        unknown = set(security) - set(_SECURITY_KWARGS)
        if unknown:
            raise TypeError(f"unknown connection options: {', '.join(sorted(unknown))}")
        self.target = target or default_target()
        self.timeout = timeout
        self._security = security
        self._client = TextGenerationClient(self.target, timeout=timeout, **security)

    @classmethod
    def from_pretrained(cls, model_id=None, *, target: str | None = None, **load_options) -> RemoteModelForCausalLM:
        """Connect to the server at `target` (default: $TEXTGEN_TARGET or 127.0.0.1:50051), so that `from clients import
        RemoteModelForCausalLM as AutoModelForCausalLM` is the only change a script needs.

        TLS and token keywords (tls_ca=..., token=...) are used for the connection. The
        server loaded its model with its own options; model_id and the other load_options
        (use_fp8, dtype, ...) are accepted for that reason and not sent.
        """
        security = {k: load_options[k] for k in _SECURITY_KWARGS if k in load_options}
        return cls(target, **security)

    @cached_property
    def model_info(self) -> ModelInfo:
        return self._client.model_info()

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, **kwargs):
        """As the engine's generate(); a `streamer` (transformers' put / end interface) gets
        the prompt and then each new token as the server streams them (GenerateStream)."""
        batch = self._prepare(input_ids, attention_mask, generation_config, kwargs, streamer)
        if streamer is None:
            return batch.assemble(self._client.generate_batch(batch.prompts, **batch.options))
        streamer.put(batch.ids.cpu())
        chunks = [_stream(streamer, c) for c in self._client.generate_stream(batch.prompts[0], **batch.options)]
        streamer.end()
        return batch.assemble([_streamed_result(chunks)])

    async def agenerate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, **kwargs):
        batch = self._prepare(input_ids, attention_mask, generation_config, kwargs, streamer)
        # grpc.aio channels belong to one event loop: one per call keeps agenerate usable from any loop.
        async with AsyncTextGenerationClient(self.target, timeout=self.timeout, **self._security) as client:
            if streamer is None:
                return batch.assemble(await client.generate_batch(batch.prompts, **batch.options))
            streamer.put(batch.ids.cpu())
            chunks = [_stream(streamer, c) async for c in client.generate_stream(batch.prompts[0], **batch.options)]
            streamer.end()
            return batch.assemble([_streamed_result(chunks)])

    def _prepare(self, input_ids, attention_mask, generation_config, kwargs, streamer=None):
        info = self.model_info
        options = _options(generation_config, kwargs)
        return_dict = bool(options.pop("return_dict_in_generate", False))
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(f"input_ids: expected a non-empty [batch, length] integer tensor, got {tuple(ids.shape)}")
        _lengths_to_new_tokens(options, ids.shape[1])
        # As in process: the caller's pad token, else the model's (which falls back to its
        # first EOS token); padding is inferred only from a known pad token.
        pad = options.pop("pad_token_id", info.pad_token_id)
        mask = _attention_mask(ids, attention_mask, pad, info.eos_token_ids)
        prompts = [[t for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids.tolist(), mask.tolist())]
        num_beams = options.get("num_beams", info.default_generation_config.get("num_beams", 1))
        if streamer is not None:  # transformers' own limits, as the engine checks them
            if num_beams > 1:
                raise ValueError("streamer: a streamer cannot be used with beam search")
            if len(prompts) * options.get("num_return_sequences", 1) > 1:
                raise ValueError("streamer: a streamer supports one sequence (batch size 1) only")
        return _Batch(ids, prompts, options, 0 if pad is None else pad, num_beams > 1, return_dict)

    def close(self) -> None:
        self._client.close()


def _stream(streamer, chunk: StreamChunk) -> StreamChunk:
    for token in chunk.token_ids:  # one put per token, as transformers' decoding loop does
        streamer.put(torch.tensor([token]))
    return chunk


def _streamed_result(chunks: list[StreamChunk]) -> GenerationResult:
    """A streamed request's one sequence, as generate_batch would have returned it."""
    last = chunks[-1]
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    sequence = Sequence(index=0, text="".join(c.text for c in chunks), token_ids=tokens,
                        finish_reason=last.finish_reason, cumulative_logprob=last.cumulative_logprob)
    return GenerationResult(request_id=last.request_id, sequences=[sequence], usage=last.usage)


def _options(generation_config, kwargs: dict) -> dict:
    """generate()'s keywords (a GenerationConfig's set fields under them) as client options."""
    options = {}
    if generation_config is not None:
        values = generation_config if isinstance(generation_config, dict) else generation_config.to_dict()
        # Like the engine: a GenerationConfig's other fields are its defaults, not the caller's doing.
        known = CONFIG_FIELDS | {"max_length", "min_length", "pad_token_id", *_RENAMED}
        options.update({k: v for k, v in values.items() if k in known and v is not None})
    for name, value in kwargs.items():
        if name not in _IGNORED_KWARGS:
            options[name] = value
    return {_RENAMED.get(k, k): v for k, v in options.items() if v is not None}


def _lengths_to_new_tokens(options: dict, width: int) -> None:
    # max_length / min_length count the (padded) prompt, as in transformers; the API
    # speaks in new tokens. max_new_tokens wins when both are given, as in transformers.
    max_length = options.pop("max_length", None)
    if max_length is not None and "max_new_tokens" not in options:
        if max_length <= width:
            raise ValueError(f"max_length: is {max_length} but the prompt already has {width} tokens")
        options["max_new_tokens"] = max_length - width
    min_length = options.pop("min_length", None)
    if min_length is not None and "min_new_tokens" not in options:
        options["min_new_tokens"] = max(0, min_length - width)


def _attention_mask(ids: torch.Tensor, attention_mask, pad: int | None, eos_token_ids: list[int]) -> torch.Tensor:
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        return mask.bool()
    # transformers infers padding only when the pad token is not also an EOS token.
    if pad is not None and pad not in eos_token_ids and (ids == pad).any():
        return ids != pad
    return torch.ones_like(ids, dtype=torch.bool)


@dataclass
class _Batch:
    """One generate() call: the input rows, the requests made of them, how to put results back."""

    ids: torch.Tensor  # [B, S] as given, padding included
    prompts: list[list[int]]  # per row, padding stripped
    options: dict  # client keywords, the same for every row
    pad: int
    beam_search: bool
    return_dict: bool

    def assemble(self, results: list[GenerationResult]):
        generated = [seq.token_ids for result in results for seq in result.sequences]
        width = max((len(g) for g in generated), default=0)
        per_row = len(results[0].sequences)
        tail = torch.full((len(generated), width), self.pad, dtype=torch.long)
        for i, tokens in enumerate(generated):
            tail[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        prompts = self.ids.repeat_interleave(per_row, dim=0).to(torch.long)
        sequences = torch.cat([prompts, tail], dim=1).to(self.ids.device)
        if not self.return_dict:
            return sequences
        scores = None
        if self.beam_search:
            scores = torch.tensor([s.cumulative_logprob for r in results for s in r.sequences], dtype=torch.float32)
        return RemoteGenerateOutput(sequences=sequences, sequences_scores=scores)
