"""LLMEngine: one synchronous step of continuous batching.

`step()` is driven by the EngineLoop thread; nothing here is thread-safe.
"""

from __future__ import annotations

import gc
import logging
import secrets

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.model_runner import InflightTokens, build_forward_batch
from engine.outputs import RequestOutput
from engine.params import SamplingParams
from engine.runtime.base import ModelRuntime
from engine.sampling.sampler import PendingSamples, Sampler, SampleRow, make_generator
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
        self.scheduler = Scheduler(config, self.block_manager, max_model_len, TextLayer(tokenizer), self._generator,
                                   prompt_graph=runtime.prompt_graph_limits)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.steps_total = 0
        self._inflight: _LaunchedStep | None = None  # launched, samples not read back yet
        raise_gc_threshold(config.gc_threshold)

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
        self._inflight = None  # its requests are finished: nothing reads its samples

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one forward pass, then read back the samples of the step
        launched before it (overlap) or of this one (when it must be read at once).

        With overlap the host schedules and launches step N+1 while the device still
        runs step N, and only then waits for step N's samples: step N+1 is already queued
        behind step N, so the device does not wait for the host between them. Step N+1's
        decode rows take their input tokens from step N's samples on the device."""
        # 1. Decide what runs.
        out = self.scheduler.schedule()
        outputs = list(out.outputs)
        launched = self._launch(out, outputs) if out.scheduled else None
        # 4. Update request state from the previous step's samples, then this one's if it
        # cannot stay in flight.
        if self._inflight is not None:
            previous, self._inflight = self._inflight, None
            outputs += self._update(previous)
        if launched is not None:
            if self.config.overlap_steps and not launched.needs_host_tokens:
                self._inflight = launched
            else:
                outputs += self._update(launched)
        self.steps_total += 1
        # 5. Hand the outputs to their requests' sinks.
        self._deliver(outputs)
        return outputs

    def _launch(self, out: SchedulerOutput, outputs: list[RequestOutput]) -> "_LaunchedStep | None":
        try:
            # 2. Run the model over the packed batch.
            if out.copies:
                self.runtime.copy_blocks(out.copies)
            inflight = self._inflight.device_tokens if self._inflight is not None else None
            batch = build_forward_batch(out, self.config.block_size, self.runtime.device, inflight,
                                        defer_feed=self.runtime.fuses_token_feed)
            logits = self.runtime.execute(batch)
            # 3. Queue the choice of next tokens (and beam steps).
            launched = self._sample(out, logits)
        except EngineDeadError:  # the runtime cannot run another step (a tensor-parallel rank died)
            raise
        except Exception as exc:  # a failed step fails its own requests only
            logger.exception("model step failed for requests %s", [r.request_id for r in out.requests])
            outputs += self.scheduler.fail(out.requests, f"model step failed: {exc!r}")
            return None
        self.scheduler.commit(out)
        return launched

    def _update(self, launched: "_LaunchedStep") -> list[RequestOutput]:
        try:
            samples = launched.samples()
        except EngineDeadError:
            raise
        except Exception as exc:
            logger.exception("sampling failed for requests %s", [r.request_id for r in launched.out.requests])
            return self.scheduler.fail(launched.out.requests, f"model step failed: {exc!r}")
        return self.scheduler.update_from_output(launched.out, samples)

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> "_LaunchedStep":
        rows: list[SampleRow] = []
        row_logits: list[int] = []
        row_owner: list[int] = []
        beam_rows: dict[str, list[tuple[int, int]]] = {}
        needs_host_tokens = False
        sampled = [s for s in out.scheduled if s.sample]
        for logits_row, s in enumerate(sampled):
            request, seq = s.request, s.seq
            if not needs_host_tokens:
                needs_host_tokens = _needs_host_tokens(request)
            if request.beam_search is not None:
                beam_rows.setdefault(request.request_id, []).append((request.seqs.index(seq), logits_row))
                continue
            # A request's first token is drawn once per output sequence from the same logits.
            generators = request.generators if not request.forked else [seq.generator]
            # The token in flight (if any) is generated too: min_new_tokens counts it.
            generated = seq.num_generated + seq.num_inflight
            for generator in generators:
                rows.append(SampleRow(request.params, seq.token_ids, generated, generator))
                row_logits.append(logits_row)
                row_owner.append(seq.seq_id)
        pending = None
        if rows:
            # Indexing by a Python list copies the index to the device, which waits for it;
            # the usual step samples every row once, in order, and needs no gather.
            identity = len(row_logits) == logits.shape[0] and row_logits == list(range(len(row_logits)))
            pending = self.sampler.launch(logits if identity else logits[row_logits], rows)
        beams = {}
        for request_id, pairs in beam_rows.items():
            pairs.sort()
            beam_logits = logits[[row for _, row in pairs]].float()  # a copy: the runtime may reuse `logits`
            beams[request_id] = self.requests[request_id].beam_search.step(beam_logits)
        return _LaunchedStep(out, self.sampler, pending, row_owner, beams, needs_host_tokens)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            request = self.requests.get(output.request_id)
            if request is None:
                continue
            if output.finished:
                del self.requests[output.request_id]
            request.sink(output)


def raise_gc_threshold(gen0: int | None) -> None:
    """Raise the interpreter's generation-0 collection threshold to gen0 (never lower it;
    the older generations' thresholds stay)."""
    current = gc.get_threshold()
    if gen0 is not None and gen0 > current[0]:
        gc.set_threshold(gen0, *current[1:])
        logger.info("garbage-collection threshold (generation 0) raised from %d to %d", current[0], gen0)


def freeze_startup_objects() -> int:
    """For a process that serves until it exits (the engine's child process, the gRPC
    server's): collect once, then move every object alive now (modules, the model's and
    the runtime's Python objects) into the collector's permanent generation, so that its
    full collections scan only what serving allocated since. Measured on the H100 with the
    7B model (bench/serve_bench.py): without it, full collections took 29 to 232 ms in the
    engine process (287,000 objects alive after start-up) and 27 to 97 ms in the server's
    (182,000), each a stall of the step loop or of the server's event loop; they
    are rare (Python runs one when the objects that survived since the last one reach a
    quarter of those it holds), but a long-running server meets them. Returns the objects
    frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("garbage collector: %d objects alive after start-up frozen out of its full collections", frozen)
    return frozen


def _needs_host_tokens(request: Request) -> bool:
    """Whether the request's next step needs this step's tokens on the host: beam steps,
    a first token that forks the request, and penalties that read the token history."""
    params = request.params
    return (params.reads_history or request.beam_search is not None
            or (not request.forked and params.num_return_sequences > 1))


class _LaunchedStep:
    """A step whose forward pass and sampling are queued on the device."""

    def __init__(self, out: SchedulerOutput, sampler: Sampler, pending: PendingSamples | None, row_owner: list[int],
                 beams: dict, needs_host_tokens: bool):
        self.out = out
        self.needs_host_tokens = needs_host_tokens
        self._sampler, self._pending, self._row_owner, self._beams = sampler, pending, row_owner, beams
        rows: dict[int, int] = {}
        for row, seq_id in enumerate(row_owner):
            rows.setdefault(seq_id, row)
        self.device_tokens = InflightTokens(pending.tokens, rows) if pending is not None else None

    def samples(self) -> StepSamples:
        """Wait for the step's samples; the only wait on the device."""
        samples = StepSamples(beams=self._beams)
        if self._pending is not None:
            tokens = samples.tokens
            for seq_id, result in zip(self._row_owner, self._sampler.results(self._pending)):
                entry = tokens.get(seq_id)
                if entry is None:
                    tokens[seq_id] = [result]
                else:
                    entry.append(result)
        return samples
