"""LLMEngine: one synchronous step of continuous batching.

`step()` is driven by the EngineLoop thread; nothing here is thread-safe.
"""

from __future__ import annotations

import logging
import secrets

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.model_runner import build_forward_batch
from engine.outputs import RequestOutput
from engine.params import SamplingParams
from engine.runtime.base import ModelRuntime
from engine.sampling.sampler import Sampler, SampleRow, make_generator
from engine.scheduler import Scheduler, SchedulerOutput, StepSamples
from engine.sequence import Request
from engine.text import TextLayer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runtime: ModelRuntime, tokenizer, config: EngineConfig, max_model_len: int, num_blocks: int):
        self.runtime = runtime
        self.config = config
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, max_model_len, TextLayer(tokenizer), self._generator)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.steps_total = 0

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if not params.do_sample or params.use_beam_search:
            return None
        # Unseeded requests still get a stream of their own, so no request's draws
        # depend on which others share its batch.
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        return make_generator(seed, index, self.runtime.device)

    # ---- requests -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        output = self.scheduler.abort(request_id)
        if output is not None:
            self._deliver([output])

    def abort_all(self) -> None:
        self._deliver(self.scheduler.abort_all())

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        # 1. Decide what runs.
        out = self.scheduler.schedule()
        outputs = list(out.outputs)
        if out.scheduled:
            try:
                # 2. Run the model over the packed batch.
                if out.copies:
                    self.runtime.copy_blocks(out.copies)
                batch = build_forward_batch(out, self.config.block_size, self.runtime.device)
                logits = self.runtime.execute(batch)
                # 3. Pick next tokens (and beam steps).
                samples = self._sample(out, logits)
            except EngineDeadError:  # the runtime cannot run another step (a tensor-parallel rank died)
                raise
            except Exception as exc:  # a failed step fails its own requests only
                logger.exception("model step failed for requests %s", [r.request_id for r in out.requests])
                outputs = outputs + self.scheduler.fail(out.requests, f"model step failed: {exc!r}")
            else:
                # 4. Update request state: the only place it changes.
                outputs = outputs + self.scheduler.update_from_output(out, samples)
        self.steps_total += 1
        # 5. Hand the outputs to their requests' sinks.
        self._deliver(outputs)
        return outputs

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> StepSamples:
        samples = StepSamples()
        rows: list[SampleRow] = []
        row_logits: list[int] = []
        row_owner: list[int] = []
        beam_rows: dict[str, list[tuple[int, int]]] = {}
        sampled = [s for s in out.scheduled if s.sample]
        for logits_row, s in enumerate(sampled):
            request, seq = s.request, s.seq
            if request.beam_search is not None:
                beam_rows.setdefault(request.request_id, []).append((request.seqs.index(seq), logits_row))
                continue
            # A request's first token is drawn once per output sequence from the same logits.
            generators = request.generators if not request.forked else [seq.generator]
            for generator in generators:
                rows.append(SampleRow(request.params, seq.token_ids, seq.num_generated, generator))
                row_logits.append(logits_row)
                row_owner.append(seq.seq_id)
        if rows:
            # Indexing by a Python list copies the index to the device, which waits for it;
            # the usual step samples every row once, in order, and needs no gather.
            identity = len(row_logits) == logits.shape[0] and row_logits == list(range(len(row_logits)))
            results = self.sampler.sample(logits if identity else logits[row_logits], rows)
            for seq_id, result in zip(row_owner, results):
                samples.tokens.setdefault(seq_id, []).append(result)
        for request_id, pairs in beam_rows.items():
            pairs.sort()
            beam_logits = logits[[row for _, row in pairs]]
            samples.beams[request_id] = self.requests[request_id].beam_search.step(beam_logits)
        return samples

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            request = self.requests.get(output.request_id)
            if request is None:
                continue
            if output.finished:
                del self.requests[output.request_id]
            request.sink(output)
