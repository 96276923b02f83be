"""Iteration-level scheduler: which sequences run in the next forward pass.

Two-phase contract:
- `schedule()` picks the work for one step within the token budget and the KV
  pool: running requests first (decodes and unfinished prefill chunks), preempting
  the newest ones by recompute when blocks run out, then waiting requests.
- `commit()` records that a step was launched: its tokens' KV is being written,
  and each sampling sequence has one token in flight.
- `update_from_output()` is the only place request state changes once the step's
  samples are read back: tokens are appended, beams re-parented, stops checked,
  blocks freed.

The engine may schedule step N+1 between the commit and the update of step N
(overlap: the host prepares the next step while the device runs this one). A
sequence then has a token in flight (`Sequence.num_inflight`): it is scheduled as
one pending token whose id the device fills in, and a sequence that the token in
flight will finish by length is not scheduled again. Steps that need every token on
the host to sample (beams, first tokens of n > 1 requests, history penalties) are
updated before the next schedule.

Every sequence catches its `num_computed` up to `len(token_ids)`; chunked prefill,
prefix-cache hits, recompute after preemption and decode are one code path.
All live sequences of a request sample in the same step (a beam step needs every
beam's logits), so a request whose sequences cannot all finish their pending
tokens this step advances each by at most `num_pending - 1`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.outputs import FinishReason, RequestOutput, SequenceOutput, TokenLogprob
from engine.runtime.base import PromptGraphLimits
from engine.sequence import Request, RequestStatus, Sequence
from engine.stop import check_stop, reaches_length

# (sequence, tokens to compute this step, whether its logits are sampled)
Plan = list[tuple[Sequence, int, bool]]


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    seq: Sequence
    num_tokens: int
    sample: bool  # its last scheduled token is the sequence's last: logits needed


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    num_decodes: int = 0
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Outputs decided while scheduling (requests that can never fit the pool).
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def requests(self) -> list[Request]:
        return list({id(s.request): s.request for s in self.scheduled}.values())


@dataclass
class StepSamples:
    """What the sampling stage decided for the sequences that sampled."""

    # seq_id -> SampleResults: one per sequence, or one per output sequence for a
    # request's first token (the request then forks into that many sequences).
    tokens: dict[int, list] = field(default_factory=dict)
    # request_id -> engine.sampling.beam_search.BeamStep
    beams: dict[str, object] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int, text, make_generator,
                 prompt_graph: PromptGraphLimits | None = None):
        self.config = config
        # Which one-prompt steps the runtime replays from a graph (see _keeps_prompts_apart).
        self.prompt_graph = prompt_graph
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.text = text  # engine.text.TextLayer: detokenizers and full decodes
        self._make_generator = make_generator  # (params, index) -> torch.Generator | None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions_total = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of those, tokens whose KV was reused

    # ---- admission and removal ------------------------------------------------------
    def add(self, request: Request) -> None:
        params = request.params
        prompt = list(request.prompt_token_ids)
        request.seqs = [Sequence(index=0, token_ids=prompt, prompt_len=len(prompt))]
        num_streams = 1 if params.use_beam_search else params.num_return_sequences
        request.generators = [self._make_generator(params, k) for k in range(num_streams)]
        if params.use_beam_search:
            from engine.sampling.beam_search import BeamSearch

            # A candidate whose text holds a stop string ends like one ending on eos
            # (transformers applies its stopping criteria to every candidate alike).
            stop_checker = (lambda ids: self.text.has_stop_string(params, ids)) if params.stop_strings else None
            request.beam_search = BeamSearch(params, prompt, params.max_new_tokens, stop_checker=stop_checker)
        self.waiting.append(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    return self._finish(request, FinishReason.ABORTED)
        return None

    def abort_all(self) -> list[RequestOutput]:
        ids = [r.request_id for r in [*self.waiting, *self.running]]
        return [o for o in map(self.abort, ids) if o is not None]

    def fail(self, requests: list[Request], message: str) -> list[RequestOutput]:
        """Finish the requests of a failed step; the engine goes on with the rest."""
        outputs = []
        for request in requests:
            if request.finished:
                continue
            for queue in (self.waiting, self.running):
                if request in queue:
                    queue.remove(request)
            request.error = message
            outputs.append(self._finish(request, FinishReason.ERROR))
        return outputs

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        seq_slots = self.config.max_num_seqs
        preempted = False

        queue = deque(self.running)  # oldest first; preemption victims come off the end
        while queue:
            request = queue.popleft()
            plan = self._plan(request, budget, seq_slots)
            if plan is None:
                continue  # no budget left for it this step; it keeps its blocks
            fits = self._fits(plan)
            while not fits and queue:
                self._preempt(queue.pop())
                preempted = True
                fits = self._fits(plan)
            if not fits:
                if not out.scheduled and len(self.running) == 1:
                    self.running.remove(request)
                    out.outputs.append(self._too_big(request))
                else:
                    self._preempt(request)
                    preempted = True
                continue
            budget -= self._commit(request, plan, out)
            seq_slots -= len(plan)

        # Admit waiting requests in arrival order, unless this step had to preempt.
        apart = self._keeps_prompts_apart(out)
        while self.waiting and not preempted and budget > 0 and seq_slots > 0:
            request = self.waiting[0]
            self._match_prefix(request)
            plan = self._plan(request, budget, seq_slots)
            if plan is None or not self._fits(plan):
                # Waiting requests hold no blocks, so the running ones can always make progress.
                self._release(request)
                if plan is not None and not self.running and not out.scheduled:
                    self.waiting.popleft()
                    out.outputs.append(self._too_big(request))
                    continue
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = request.seqs[0].num_computed
                self.prefix_queries += request.prompt_len
                self.prefix_hits += request.num_cached_tokens
            self.running.append(request)
            budget -= self._commit(request, plan, out)
            seq_slots -= len(plan)
            if apart and self._graph_prompt(request, plan):
                break  # the step's one prompt

        # One-token chunks go first: the runtime attends to them as one batched decode.
        out.scheduled.sort(key=lambda s: s.num_tokens != 1)
        out.num_decodes = sum(1 for s in out.scheduled if s.num_tokens == 1)
        return out

    def _keeps_prompts_apart(self, out: SchedulerOutput) -> bool:
        """Whether this step takes in one waiting prompt at most. A runtime that replays a
        step of one fresh prompt from a graph runs a step of two eagerly; while few requests
        wait (EngineConfig.single_prompt_max_waiting), each prompt's own graph step returns
        its first token sooner than their shared eager step, and the running streams are
        not held up by it. Only for a step that can still be such a graph step: every row
        so far a decode, and few enough of them."""
        limits = self.prompt_graph
        return (limits is not None and 0 < len(self.waiting) <= self.config.single_prompt_max_waiting
                and len(out.scheduled) <= limits.max_decodes and all(s.num_tokens == 1 for s in out.scheduled))

    def _graph_prompt(self, request: Request, plan: Plan) -> bool:
        """Whether the request just admitted makes the step one the runtime replays from a
        graph: one sequence's whole prompt, no prefix from the cache, short enough."""
        if len(plan) != 1:
            return False
        seq, n, _ = plan[0]
        return seq.num_computed == 0 and n == seq.prompt_len <= self.prompt_graph.max_tokens

    def _match_prefix(self, request: Request) -> None:
        for seq in request.live_seqs:
            if not seq.table.blocks:
                seq.num_computed = self.blocks.match_prefix(seq.table, seq.token_ids)

    def _finishes_by_length(self, request: Request, seq: Sequence) -> bool:
        """Its token in flight will end it (max_new_tokens or the context): nothing to run."""
        if not seq.num_inflight:
            return False
        total = len(seq.token_ids) + seq.num_inflight
        return reaches_length(total - seq.prompt_len, total, request.params, self.max_model_len)

    def _plan(self, request: Request, budget: int, seq_slots: int) -> Plan | None:
        if len(request.seqs) == 1:  # the usual request; the same rule as below, spelt out for speed
            seq = request.seqs[0]
            if seq.finish_reason is not None or seq_slots < 1 or self._finishes_by_length(request, seq):
                return None
            pending = seq.num_pending
            if pending <= budget:
                return [(seq, pending, True)]
            n = min(pending - 1, budget)
            return [(seq, n, False)] if n > 0 else None
        live = [s for s in request.live_seqs if not self._finishes_by_length(request, s)]
        if not live or len(live) > seq_slots:
            return None
        if sum(s.num_pending for s in live) <= budget:
            return [(s, s.num_pending, True) for s in live]
        plan = []
        for s in live:
            n = min(s.num_pending - 1, budget)
            if n > 0:
                plan.append((s, n, False))
                budget -= n
        return plan or None

    def _fits(self, plan: Plan) -> bool:
        need = 0
        for seq, n, _ in plan:
            need += self.blocks.slots_needed(seq.table, seq.num_computed, n)
        return need <= self.blocks.num_free_blocks

    def _commit(self, request: Request, plan: Plan, out: SchedulerOutput) -> int:
        """Allocate the plan's slots and schedule it; returns its token count."""
        tokens = 0
        for seq, n, sample in plan:
            copies = self.blocks.allocate(seq.table, seq.num_computed, n)
            if copies:
                out.copies.extend(copies)
            out.scheduled.append(ScheduledSeq(request, seq, n, sample))
            tokens += n
        return tokens

    def _release(self, request: Request) -> None:
        for seq in request.seqs:
            self.blocks.free(seq.table)
            seq.num_computed = 0

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks; it recomputes from the head of the queue."""
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(request)

    def _too_big(self, request: Request) -> RequestOutput:
        request.error = (
            f"the request needs more KV cache than the whole pool "
            f"({self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens)"
        )
        return self._finish(request, FinishReason.ERROR)

    # ---- the update step ----------------------------------------------------------------
    def commit(self, out: SchedulerOutput) -> None:
        """The step was launched: its tokens' KV is being written, its samples are in flight."""
        bs = self.blocks.block_size
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed += s.num_tokens
            if seq.num_computed // bs > seq.table.num_hashed:  # a block may have filled up
                self.blocks.register_full_blocks(seq.table, seq.token_ids, seq.num_computed)
            if s.sample:
                seq.num_inflight += 1

    def update_from_output(self, out: SchedulerOutput, samples: StepSamples) -> list[RequestOutput]:
        """Apply a committed step's samples. Requests and sequences that finished since
        (aborted, or stopped by the step before) ignore theirs."""
        outputs = list(out.outputs)
        by_request: dict[int, list[ScheduledSeq]] = {}  # the sampled sequences of each request, in order
        for s in out.scheduled:
            if s.sample:
                s.seq.num_inflight -= 1
                group = by_request.get(id(s.request))
                if group is None:
                    by_request[id(s.request)] = [s]
                else:
                    group.append(s)
        tokens = samples.tokens
        bs = self.blocks.block_size
        for group in by_request.values():
            request = group[0].request
            if request.finished:
                continue
            if request.beam_search is not None:
                self._apply_beam_step(request, samples.beams[request.request_id])
            elif not request.forked:
                self._fork(request, tokens[request.seqs[0].seq_id])
            else:
                for s in group:
                    if s.seq.finish_reason is None:
                        self._append(request, s.seq, tokens[s.seq.seq_id][0])
            live = request.live_seqs
            for seq in live:
                # Blocks whose last token was in flight at commit can be hashed now.
                if seq.num_computed // bs > seq.table.num_hashed:
                    self.blocks.register_full_blocks(seq.table, seq.token_ids, seq.num_computed)
            if not live or (request.beam_search is not None and request.beam_search.done):
                # A request preempted after its step was launched finishes from the waiting queue.
                (self.running if request in self.running else self.waiting).remove(request)
                outputs.append(self._finish(request, None))
            elif not request.params.final_output_only:  # otherwise the deltas pile up until the end
                outputs.append(self._output(request))
        return outputs

    def _fork(self, request: Request, results: list) -> None:
        """After the prompt: one sequence per output, sharing the prompt's blocks."""
        root = request.seqs[0]
        seqs = [root] + [
            Sequence(index=k, token_ids=list(root.token_ids), prompt_len=root.prompt_len,
                     num_computed=root.num_computed, table=self.blocks.fork(root.table))
            for k in range(1, len(results))
        ]
        for seq, generator in zip(seqs, request.generators):
            seq.generator = generator
        request.seqs = seqs
        request.forked = True
        for seq, result in zip(seqs, results):
            self._append(request, seq, result)

    def _append(self, request: Request, seq: Sequence, result) -> None:
        params = request.params
        token = result.token_id
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        seq.cumulative_logprob += result.logprob
        if params.logprobs is not None:
            seq.new_logprobs.append(TokenLogprob(token, result.logprob, tuple(result.top_logprobs)))
        stop_string_hit = False
        if params.needs_text:
            if seq.detokenizer is None:
                seq.detokenizer = self.text.detokenizer(params)
            step = seq.detokenizer.push(token)
            seq.new_text += step.text
            stop_string_hit = step.stopped
        total = len(seq.token_ids)
        reason = check_stop(token, total - seq.prompt_len, total, params, self.max_model_len, stop_string_hit)
        if reason is not None:
            self._finish_seq(seq, reason)

    def _finish_seq(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        if reason is not FinishReason.STOP_STRING and seq.detokenizer is not None:
            seq.new_text += seq.detokenizer.flush()
        self.blocks.free(seq.table)

    def _apply_beam_step(self, request: Request, step) -> None:
        old = request.seqs if request.forked else [request.seqs[0]]
        claimed: set[int] = set()
        new = []
        for k, parent_index in enumerate(step.parents):
            parent = old[parent_index]
            if parent_index in claimed:
                child = Sequence(index=k, token_ids=list(parent.token_ids), prompt_len=parent.prompt_len,
                                 num_computed=parent.num_computed, table=self.blocks.fork(parent.table))
            else:
                claimed.add(parent_index)
                child = parent
            new.append(child)
        for i, seq in enumerate(old):
            if i not in claimed:
                self.blocks.free(seq.table)
        # Forks copied their parent's tokens above, so appending now is safe.
        for k, (seq, token) in enumerate(zip(new, step.tokens)):
            seq.index = k
            seq.token_ids.append(token)
        request.seqs = new
        request.forked = True

    # ---- outputs ----------------------------------------------------------------------
    def _finish(self, request: Request, reason: FinishReason | None) -> RequestOutput:
        """Close a request: stop its live sequences with `reason` and free everything."""
        beam_output = request.beam_search is not None and request.beam_search.done and reason is None
        for seq in request.seqs:
            if not seq.finished:
                self._finish_seq(seq, reason or FinishReason.ABORTED)
            self.blocks.free(seq.table)
        request.status = RequestStatus.FINISHED
        if beam_output:
            return self._beam_output(request)
        return self._output(request)

    def _output(self, request: Request) -> RequestOutput:
        with_logprobs = request.params.logprobs is not None
        sequences = []
        for seq in request.seqs:
            finished = seq.finish_reason is not None
            if not (seq.new_token_ids or seq.new_text or finished and not seq.finish_reported):
                continue
            sequences.append(SequenceOutput(seq.index, tuple(seq.new_token_ids), seq.new_text, seq.finish_reason,
                                            seq.cumulative_logprob,
                                            tuple(seq.new_logprobs) if with_logprobs else None))
            seq.new_token_ids, seq.new_text = [], ""
            if with_logprobs:
                seq.new_logprobs = []
            seq.finish_reported = finished
        return self._request_output(request, sequences)

    def _beam_output(self, request: Request) -> RequestOutput:
        sequences = []
        for i, hyp in enumerate(request.beam_search.finalize()):
            ids = tuple(hyp.token_ids)
            reason = self._beam_finish_reason(request, ids)
            sequences.append(SequenceOutput(index=i, token_ids=ids, text=self._beam_text(request.params, ids),
                                            finish_reason=reason, cumulative_logprob=float(hyp.score)))
        request.beam_completion_tokens = sum(len(s.token_ids) for s in sequences)
        return self._request_output(request, sequences)

    def _beam_finish_reason(self, request: Request, token_ids: tuple[int, ...]) -> FinishReason:
        """Why a finished hypothesis ended, by check_stop on its last token: an eos or stop
        token, else a stop string in its text, else its length. (A hypothesis may also be a
        running beam that the search ended with: LENGTH.)"""
        if not token_ids:
            return FinishReason.LENGTH
        params = request.params
        reason = check_stop(token_ids[-1], len(token_ids), request.prompt_len + len(token_ids), params,
                            self.max_model_len, self.text.has_stop_string(params, token_ids))
        return reason or FinishReason.LENGTH

    def _beam_text(self, params, token_ids) -> str:
        return self.text.decode(params, token_ids) if params.needs_text else ""

    def _request_output(self, request: Request, sequences: list[SequenceOutput]) -> RequestOutput:
        completion = request.beam_completion_tokens
        if completion is None:
            completion = request.num_completion_tokens
        queued = request.first_scheduled_time
        return RequestOutput(request.request_id, tuple(sequences), request.finished, request.prompt_len, completion,
                             request.num_cached_tokens, request.error,
                             queued - request.arrival_time if queued is not None else None)
