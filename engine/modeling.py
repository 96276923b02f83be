"""transformers-style entry points: AutoModelForCausalLM and its generate()/agenerate().

generate() returns what transformers returns: the prompt rows followed by the new
tokens, right-padded with pad_token_id, one row per returned sequence. Each prompt
row becomes one engine request; all rows run in the shared continuous batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from engine.async_engine import AsyncEngine
from engine.errors import InvalidParameterError, output_error
from engine.outputs import RequestOutput
from engine.params import GenerationRequest, SamplingParams

# generate() keywords of transformers that change nothing here.
_IGNORED_KWARGS = {"use_cache", "tokenizer", "output_scores", "synced_gpus"}


@dataclass
class GenerateOutput:
    """transformers' dict output for return_dict_in_generate=True (the fields we fill)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class _RowResult:
    token_ids: list[list[int]]  # per returned sequence
    scores: list[float]


class CausalLM:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.device = torch.device("cpu")

    # ---- what transformers users reach for -------------------------------------------------
    @property
    def model_info(self):
        return self.engine.info

    @property
    def name_or_path(self) -> str:
        return str(self.engine._loaded.folder)

    @cached_property
    def tokenizer(self):
        """transformers' tokenizer for the model (imported on first use: it is slow to import)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.name_or_path)

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.name_or_path)

    @cached_property
    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig.from_dict(dict(self.engine._loaded.generation_defaults))

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, **kwargs):
        """transformers' generate(). A `streamer` (transformers' TextStreamer,
        TextIteratorStreamer, or any object with put / end) gets the prompt and then each
        new token as transformers hands them over: put() on the caller's thread."""
        requests, rows, return_dict = self._prepare(input_ids, attention_mask, generation_config, kwargs, streamer)
        if streamer is None:
            results = _run_sync(self.engine, requests)
        else:
            results = [_run_streamed(self.engine, requests[0], rows, streamer)]
        return self._assemble(rows, requests, results, return_dict)

    async def agenerate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, **kwargs):
        requests, rows, return_dict = self._prepare(input_ids, attention_mask, generation_config, kwargs, streamer)
        if streamer is not None:
            streamer.put(rows.cpu())
        results = await asyncio.gather(*(_run_async(self.engine, r, streamer) for r in requests))
        if streamer is not None:
            streamer.end()
        return self._assemble(rows, requests, results, return_dict)

    def _prepare(self, input_ids, attention_mask, generation_config, kwargs, streamer=None):
        kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS}
        return_dict = bool(kwargs.pop("return_dict_in_generate", False))
        if input_ids is None:
            raise InvalidParameterError("input_ids", "input_ids is required")
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
            raise InvalidParameterError("input_ids", f"expected a non-empty [batch, length] integer tensor, got shape {tuple(ids.shape)}")
        params = self.engine._loaded.resolve_params(ids.shape[1], generation_config, **kwargs)
        if streamer is not None:  # transformers' own limits
            if params.use_beam_search:
                raise InvalidParameterError("streamer", "a streamer cannot be used with beam search")
            if ids.shape[0] * params.num_sequences > 1:
                raise InvalidParameterError("streamer", "a streamer supports one sequence (batch size 1) only")
        # generate() returns token ids once all are there: the engine need not build text
        # as it goes, nor report each step (unless a streamer wants each token).
        params = replace(params, detokenize=False, final_output_only=streamer is None)
        mask = self._attention_mask(ids, attention_mask, params)
        requests = []
        for row, row_mask in zip(ids.tolist(), mask.tolist()):
            prompt = [t for t, m in zip(row, row_mask) if m]
            requests.append(GenerationRequest(prompt_token_ids=prompt, params=params))
        return requests, ids, return_dict

    @staticmethod
    def _attention_mask(ids: torch.Tensor, attention_mask, params: SamplingParams) -> torch.Tensor:
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if mask.shape != ids.shape:
                raise InvalidParameterError("attention_mask", f"shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
            return mask.bool()
        # transformers infers padding only when the pad token is not also an EOS token.
        pad = params.pad_token_id
        if pad is not None and pad not in params.eos_token_ids and (ids == pad).any():
            return ids != pad
        return torch.ones_like(ids, dtype=torch.bool)

    def _assemble(self, ids: torch.Tensor, requests, results: list[_RowResult], return_dict: bool):
        params = requests[0].params
        pad = params.pad_token_id if params.pad_token_id is not None else 0
        generated = [seq for result in results for seq in result.token_ids]
        width = max((len(g) for g in generated), default=0)
        per_row = len(results[0].token_ids)
        prompts = ids.repeat_interleave(per_row, dim=0)
        tail = torch.full((len(generated), width), pad, dtype=torch.long)
        for i, g in enumerate(generated):
            tail[i, : len(g)] = torch.tensor(g, dtype=torch.long)
        sequences = torch.cat([prompts.to(torch.long), tail], dim=1).to(ids.device)
        if not return_dict:
            return sequences
        scores = None
        if params.use_beam_search:
            scores = torch.tensor([s for r in results for s in r.scores], dtype=torch.float32)
        return GenerateOutput(sequences=sequences, sequences_scores=scores)


def _collect(outputs: list[RequestOutput]) -> _RowResult:
    by_index: dict[int, list[int]] = {}
    scores: dict[int, float] = {}
    for output in outputs:
        for seq in output.sequences:
            by_index.setdefault(seq.index, []).extend(seq.token_ids)
            scores[seq.index] = seq.cumulative_logprob
    order = sorted(by_index)
    return _RowResult([by_index[i] for i in order], [scores[i] for i in order])


def _run_sync(engine: AsyncEngine, requests: list[GenerationRequest]) -> list[_RowResult]:
    """Submit every row and block until all finish; safe from any thread."""
    done = threading.Event()
    outputs: list[list[RequestOutput]] = [[] for _ in requests]
    remaining = [len(requests)]
    ids = []

    def make_sink(slot: int):
        def sink(output: RequestOutput) -> None:
            outputs[slot].append(output)
            if output.finished:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return sink

    loop = engine._loop
    try:
        for i, request in enumerate(requests):
            ids.append(loop.submit(request, make_sink(i), field="input_ids"))
        done.wait()
    except BaseException:
        for request_id in ids:
            loop.abort(request_id)
        raise
    for row in outputs:
        if row and row[-1].error is not None:
            raise output_error(row[-1].error, row[-1].engine_stopped)
    return [_collect(row) for row in outputs]


def _run_streamed(engine: AsyncEngine, request: GenerationRequest, prompt: torch.Tensor, streamer) -> _RowResult:
    """One request whose new tokens go to streamer.put one at a time, on this thread (a slow
    streamer must not hold up the step loop), after the prompt; then streamer.end()."""
    arrived: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    loop = engine._loop
    request_id = loop.submit(request, arrived.put, field="input_ids")
    outputs: list[RequestOutput] = []
    try:
        streamer.put(prompt.cpu())
        while not outputs or not outputs[-1].finished:
            outputs.append(arrived.get())
            _stream(streamer, outputs[-1])
    except BaseException:
        loop.abort(request_id)
        raise
    if outputs[-1].error is not None:
        raise output_error(outputs[-1].error, outputs[-1].engine_stopped)
    streamer.end()
    return _collect(outputs)


def _stream(streamer, output: RequestOutput) -> None:
    for seq in output.sequences:
        for token in seq.token_ids:  # one put per token, as transformers' decoding loop does
            streamer.put(torch.tensor([token]))


async def _run_async(engine: AsyncEngine, request: GenerationRequest, streamer=None) -> _RowResult:
    outputs = []
    async for output in engine.generate(request, prompt_field="input_ids"):
        if streamer is not None and output.error is None:
            _stream(streamer, output)
        outputs.append(output)
    return _collect(outputs)


class AutoModelForCausalLM:
    """Mirror of optimum-nvidia's / transformers' entry point."""

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, model=None, *, use_fp8: bool = False, dtype=None, device=None, **engine_options) -> CausalLM:
        """Load a checkpoint folder, a GGUF file (or folder + gguf_file=), a cached hub id,
        or None / "default" (the embedded SmolLM2-135M-Instruct)."""
        engine = AsyncEngine.from_pretrained(model, use_fp8=use_fp8, dtype=dtype, device=device, **engine_options)
        return CausalLM(engine)
