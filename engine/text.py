"""Text for the scheduler: a detokenizer per sequence, and whole decodes for beams."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.params import SamplingParams


class TextLayer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # engine.tokenizer.TextTokenizer

    def detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, params.stop_strings, skip_special_tokens=True)

    def decode(self, params: SamplingParams, token_ids) -> str:
        """The text of a finished sequence, cut at its first stop string."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop_strings) if i >= 0), default=len(text))
        return text[:cut]

    def has_stop_string(self, params: SamplingParams, token_ids) -> bool:
        """Whether the text of generated tokens holds one of params.stop_strings: the test a
        beam-search candidate ends by (a sequence outside beam search stops at the same
        point through its detokenizer; both look at the generated text only)."""
        if not params.stop_strings:
            return False
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return any(s in text for s in params.stop_strings)
