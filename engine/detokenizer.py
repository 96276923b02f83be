"""Streaming token ids -> text for one sequence, with stop strings.

Two stages per pushed token:

1. Decoding. Only a short window of recent tokens is decoded, never the whole sequence:
   `ids[prefix:]`, where tokens before `read` have been fully turned into text and
   `ids[prefix:read]` (at least one token that produces text) is kept only as left
   context, because some decoders treat a window's first token specially (SentencePiece
   drops its leading space). The new text is the window's text beyond what was already
   taken from it. Trailing U+FFFD is held back: byte-level BPE (and byte fallback) shows a
   character whose bytes span tokens as U+FFFD until its last byte arrives. When the
   window's text ends cleanly the window slides forward, so each step decodes a few tokens.
   A ByteFallback decoder (SentencePiece models) decodes a run of "<0xNN>" tokens as a
   whole, valid UTF-8 or one U+FFFD per byte, so such a run's text waits for its end.

2. Stop strings. Text that could be the beginning of a stop string is held back. When a
   stop string completes, the text before its first occurrence is released and nothing
   after. Invariant making a search of the held-back text enough: for every released
   character, the text from it to the end of what was decoded at its release neither
   contains a stop string nor is the beginning of one, so no occurrence can start in
   released text.

All deltas plus flush() equal tokenizer.decode(ids, skip_special_tokens) cut at the first
stop string. (Exact for decoders whose text for a token prefix is a prefix of the text for
more tokens: byte-level BPE, SentencePiece. Not for WordPiece's cleanup, and decode's
clean_up_tokenization_spaces, applied to non-BPE models only, is not applied here.)
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.tokenizer import TextTokenizer

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokenizerStep:
    text: str  # newly released text, possibly empty
    stopped: bool = False
    stop_string: str | None = None  # the stop string that ended the sequence


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: TextTokenizer, stop_strings: tuple[str, ...] = (), skip_special_tokens: bool = True
    ):
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings: an empty stop string would match everywhere")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are fully decoded
        self._taken = 0  # characters of decode(ids[prefix:]) already passed to the stop stage
        self._pending = ""  # decoded text held back as a possible stop-string beginning
        self._in_byte_run = False  # the last token that reached the decoder was "<0xNN>"
        self._released: list[str] = []
        self._stopped = False
        self._stop_string: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    def push(self, token_id: int) -> DetokenizerStep:
        if self._stopped or self._flushed:
            raise RuntimeError("push() after the sequence stopped or was flushed")
        self._ids.append(token_id)
        if self._continues_byte_run(token_id):
            return DetokenizerStep("")
        window = self._decode(self._prefix, len(self._ids))
        stable = window.rstrip(_REPLACEMENT)
        new = stable[self._taken :] if len(stable) > self._taken else ""
        if len(stable) == len(window):
            self._slide(window)
        else:
            # Possibly an incomplete character at the end: keep the window, remember what was taken.
            self._taken = max(self._taken, len(stable))
        return self._pass_stop_stage(new, final=False)

    def flush(self) -> str:
        """Release everything held back; the sequence ended for a reason other than a stop string.

        Incomplete trailing bytes come out as U+FFFD, as tokenizer.decode shows them.
        Idempotent; returns "" after a stop string.
        """
        if self._stopped or self._flushed:
            return ""
        self._flushed = True
        window = self._decode(self._prefix, len(self._ids))
        new = window[self._taken :]
        self._taken = len(window)
        return self._pass_stop_stage(new, final=True).text

    def _continues_byte_run(self, token_id: int) -> bool:
        if token_id in self._tokenizer.byte_fallback_ids:
            self._in_byte_run = True
        elif not (self._skip_special and token_id in self._tokenizer.skippable_ids):
            # A skipped token never reaches the decoder, so it does not end a run.
            self._in_byte_run = False
        return self._in_byte_run

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode_raw(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _slide(self, window: str) -> None:
        """The window's text ended cleanly: everything up to the last token is decoded."""
        end = len(self._ids)
        context = self._decode(self._read, end)
        if context:
            # The tokens just decoded become the next window's left context.
            self._prefix, self._read = self._read, end
            self._taken = len(context)
        else:
            # They produced no text (skipped special tokens): keep the older context so the
            # next token is not decoded as if it began the text.
            self._read = end
            self._taken = len(window)

    def _pass_stop_stage(self, new: str, final: bool) -> DetokenizerStep:
        buf = self._pending + new
        hit = self._first_stop(buf) if self._stops else None
        if hit is not None:
            start, stop = hit
            out, self._pending = buf[:start], ""
            self._stopped, self._stop_string = True, stop
        elif final or not self._stops:
            out, self._pending = buf, ""
        else:
            keep = self._stop_prefix_start(buf)
            out, self._pending = buf[:keep], buf[keep:]
        if out:
            self._released.append(out)
        return DetokenizerStep(out, self._stopped, self._stop_string)

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """Earliest occurrence in buf; at equal starts the shorter stop string (it ends first)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at, len(stop)) < best[:2]):
                best = (at, len(stop), stop)
        return None if best is None else (best[0], best[2])

    def _stop_prefix_start(self, buf: str) -> int:
        """Start of the longest suffix of buf that begins some stop string (len(buf) if none)."""
        for i in range(max(0, len(buf) - self._max_stop_len + 1), len(buf)):
            tail = buf[i:]
            if any(stop.startswith(tail) for stop in self._stops):
                return i
        return len(buf)
