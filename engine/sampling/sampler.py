"""Next-token choice for non-beam sequences: greedy or sampled, one row per sequence.

Sampling uses the exponential race: with E_i ~ Exponential(1) independent,
argmax_i p_i / E_i is distributed as Categorical(p) (E_i / p_i is exponential with
rate p_i, and the smallest of independent exponentials is i with probability
p_i / sum p). We use it rather than torch.multinomial because
* each row draws its own noise from its own generator, so a seeded sequence gets
  the same tokens whatever else shares its batch (one shared draw over the batch
  would tie a row's randomness to its position and neighbours);
* the draw is a noise fill plus one batched argmax: nothing is read back to the
  host until the single transfer of all chosen tokens at the end, so the GPU is
  never synchronised per row (multinomial works row by row and may sync).

`launch` queues a step's sampling and `results` waits for it, so the engine can
launch the next forward pass in between (engine/llm_engine.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
from dataclasses import dataclass

import torch

from engine.params import SamplingParams
from engine.sampling.processors import may_change_scores, process_logits
from engine.transfer import to_device

# The CUDA runtime's Triton kernel for plain greedy rows (engine/runtime/cuda/kernels.py).
_FUSED_GREEDY = importlib.util.find_spec("triton") is not None

# Exponential noise of exactly 0 (possible in float32) would divide by zero; the
# smallest normal float32 keeps p / E finite (<= 1 / 1.2e-38 < float32 max).
_TINY = torch.finfo(torch.float32).tiny


@dataclass(slots=True)
class SampleRow:
    """One sequence that needs a next token this step."""

    params: SamplingParams
    token_ids: list[int]  # prompt + generated so far (transformers' input_ids)
    num_generated: int  # for min_new_tokens
    generator: torch.Generator | None  # per-sequence, seeded; None => nondeterministic


@dataclass(slots=True)  # one per row and step: slots build three times faster than frozen
class SampleResult:
    token_id: int
    logprob: float  # log-softmax of the RAW model logits at token_id
    # params.logprobs alternatives from the raw log-softmax, best first; () when logprobs is None.
    top_logprobs: tuple[tuple[int, float], ...]


def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator:
    """A generator for output sequence `index` of a request seeded with `seed`.

    Each index gets its own stream (num_return_sequences > 1 must not repeat one
    sample), derived by hashing (seed, index) so that nearby seeds or indices give
    unrelated streams. seed None: a fresh random seed (still one stream per row)."""
    if seed is None:
        seed = secrets.randbits(63)
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # < 2**63
    return generator


@dataclass
class PendingSamples:
    """A sampling step launched on the device; `Sampler.results` reads it back.

    `tokens` stays on the device: the next step's decode rows take their input token
    from it without the host seeing it first."""

    tokens: torch.Tensor  # [rows] int64 on the logits' device
    packed: torch.Tensor  # [rows, 2 + 2k] float64: token, its logprob, top-k ids, top-k logprobs
    ready: torch.cuda.Event | None  # recorded after the copy of `packed` to pinned host memory
    logprobs: list[int | None]  # each row's params.logprobs
    top_k: int


class Sampler:
    def __init__(self) -> None:
        # Stop-id lists on the device for the fused greedy kernel, by (device, ids).
        self._shared_bans: dict[tuple[str, int | None, tuple[int, ...]], torch.Tensor] = {}

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        """logits: [len(rows), vocab], row i for rows[i]. Returns one result per row."""
        return self.results(self.launch(logits, rows))

    def launch(self, logits: torch.Tensor, rows: list[SampleRow]) -> PendingSamples:
        """Queue the sampling of every row on the logits' device; nothing waits for it."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} sample rows")
        params = [r.params for r in rows]
        sampling = [i for i, p in enumerate(params) if p.do_sample]
        k = min(max((p.logprobs or 0) for p in params), logits.shape[1]) if params else 0
        fused = _FUSED_GREEDY and logits.is_cuda and not sampling and k == 0
        generated = [r.num_generated for r in rows]
        processed = bans = None
        if fused and not any(p.reads_history for p in params):
            # Greedy rows whose only processor is min_new_tokens' mask of the stop ids:
            # the fused kernel skips those ids itself. The processors' path costs about ten
            # small kernels and two copies a step: on the H100 (7B FP8, batch 1, every step
            # under min_new_tokens, docs/benchmarks.md) the device was busy 20 us a step
            # less and the run 1.010 times as fast.
            bans = self._min_tokens_bans(params, generated, logits.device)
        elif not fused or may_change_scores(params, generated):
            # transformers widens the logits to float32 before its processors; the fused
            # greedy kernel widens each element as it reads it (same values, no copy).
            logits = logits.float()
            processed = process_logits(logits, params, [r.token_ids for r in rows], generated)
        if fused and (processed is None or processed is logits):
            # Plain greedy rows: argmax and the chosen logprob in one kernel (the usual
            # offline batch; see greedy_with_logprob).
            from engine.runtime.cuda.kernels import greedy_with_logprob

            tokens, packed = greedy_with_logprob(logits, bans)  # packed as below, in the same kernel
        else:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            tokens = processed.argmax(dim=-1)  # greedy rows keep this
            if sampling:
                index = to_device(sampling, torch.long, logits.device)
                probs = processed.index_select(0, index).softmax(dim=-1)
                noise = self._exponential_noise(probs, [rows[i].generator for i in sampling])
                tokens = tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))
            columns = [tokens.unsqueeze(1), raw_logprobs.gather(1, tokens.unsqueeze(1))]
            if k:
                top = torch.topk(raw_logprobs, k, dim=-1)
                columns += [top.indices, top.values]
            # The step's only transfer back: token ids, their logprobs and the top-k
            # alternatives travel together as float64 (exact for ids below 2**53 and for
            # float32 logprobs).
            packed = torch.cat([c.to(torch.float64) for c in columns], dim=1)
        ready = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            packed = host
        return PendingSamples(tokens, packed, ready, [p.logprobs for p in params], k)

    @staticmethod
    def results(pending: PendingSamples) -> list[SampleResult]:
        """Wait for a launched step's samples (the step's only wait on the device)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        packed = pending.packed.tolist()
        k = pending.top_k
        results = []
        for row, want in zip(packed, pending.logprobs):
            alternatives: tuple[tuple[int, float], ...] = ()
            if want:
                alternatives = tuple(zip((int(t) for t in row[2 : 2 + want]), row[2 + k : 2 + k + want]))
            results.append(SampleResult(int(row[0]), row[1], alternatives))
        return results

    def _min_tokens_bans(self, params: list[SamplingParams], generated: list[int],
                         device: torch.device) -> torch.Tensor | None:
        """The ids each row may not choose yet (min_new_tokens' stop ids) for the fused
        greedy kernel, padded with -1 to a multiple of its GREEDY_BANS; None when no row
        waits for its minimum. The usual case (every row waiting, one stop-id set) is one
        list kept on the device: no copy a step."""
        from engine.runtime.cuda.kernels import GREEDY_BANS

        lists = [p.sorted_stop_token_ids if p.min_new_tokens > n else () for p, n in zip(params, generated)]
        if not any(lists):
            return None
        width = -(-max(map(len, lists)) // GREEDY_BANS) * GREEDY_BANS

        def padded(ids: tuple[int, ...]) -> list[int]:
            return list(ids) + [-1] * (width - len(ids))

        first = lists[0]
        if any(ids != first for ids in lists):
            return to_device([padded(ids) for ids in lists], torch.int64, device)
        key = (device.type, device.index, first)
        shared = self._shared_bans.get(key)
        if shared is None:
            if len(self._shared_bans) >= 64:
                self._shared_bans.clear()
            shared = self._shared_bans[key] = to_device(padded(first), torch.int64, device)
        return shared

    @staticmethod
    def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        for j, g in enumerate(generators):
            if g is not None:
                # Exactly one vocab-sized draw per row and step: the row's stream does
                # not depend on the batch.
                noise[j].exponential_(generator=g)
        if unseeded:
            index = to_device(unseeded, torch.long, probs.device)
            fresh = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
            noise.index_copy_(0, index, fresh.exponential_())
        return noise.clamp_min_(_TINY)
