"""Text <-> token ids for a Hugging Face tokenizer folder, without importing transformers.

transformers takes seconds to import and the server's warm start must stay short, so
this wraps the `tokenizers` library (which does the actual work for transformers' fast
tokenizers too) and reproduces the few things transformers layers on top of it:

* the special tokens named in tokenizer_config.json (bos/eos/unk/pad/..., any other
  `*_token` string, `extra_special_tokens` / `additional_special_tokens`); named ones
  missing from the vocabulary are added as special tokens, as transformers does;
* decode's `clean_up_tokenization_spaces`, which transformers ignores for BPE models;
* chat templates, rendered the way transformers renders them (see engine/chat_template.py).

tokenizer.json is otherwise taken as the truth, as transformers does when the file exists:
it then drops tokenizer_config.json's add_bos_token / add_eos_token, and so do we (the
post-processor in tokenizer.json decides what encode adds). transformers' model-specific
tokenizer classes that rebuild the pipeline in Python are not emulated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer

from engine.chat_template import compile_chat_template, render_chat_template
from engine.errors import InvalidParameterError, ModelLoadError

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# transformers' named special tokens, in its order (all_special_ids keeps this order).
_STANDARD_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(config: dict) -> dict[str, str]:
    """attribute name -> token text, standard names first, like transformers' special_tokens_map."""
    named = {k: c for k in _STANDARD_SPECIAL if (c := _token_content(config.get(k))) is not None}
    # transformers also treats any other `*_token` string (image_token, ...) as a named special
    # token, and a dict-valued extra_special_tokens as more of them.
    for key, value in config.items():
        content = _token_content(value)
        if key.endswith("_token") and key not in _STANDARD_SPECIAL and content is not None:
            named[key] = content
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update({k: c for k, v in extra.items() if (c := _token_content(v)) is not None})
    return named


def _extra_special_tokens(config: dict) -> list[str]:
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if isinstance(extra, (list, tuple)):
        return [c for v in extra if (c := _token_content(v)) is not None]
    return []


def _read_chat_template(folder: Path, config: dict) -> str | dict[str, str] | None:
    """chat_template.jinja wins over an inline template, as in transformers' loader."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    inline = config.get("chat_template")
    if isinstance(inline, list):  # [{"name": ..., "template": ...}, ...]
        return {t["name"]: t["template"] for t in inline}
    return inline


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict, chat_template: str | dict[str, str] | None = None):
        self._tok = tokenizer
        self._special_map = _named_special_tokens(config)
        self._chat_template = chat_template
        if self.chat_template is not None:
            # A template that does not compile is the model's fault: say so at load, not per request.
            try:
                compile_chat_template(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ModelLoadError(f"the tokenizer's chat template does not compile: {exc}") from exc
        special_texts = list(dict.fromkeys([*self._special_map.values(), *_extra_special_tokens(config)]))
        self._register_special_tokens(special_texts)
        self._special_ids = [self._tok.token_to_id(t) for t in special_texts]
        # Added tokens marked special: what decode(skip_special_tokens=True) drops.
        self.skippable_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # "<0xNN>" tokens of a ByteFallback decoder (none for byte-level BPE).
        self.byte_fallback_ids = self._find_byte_fallback_ids()
        # transformers skips this cleanup for BPE models: it would eat real spaces before punctuation.
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> TextTokenizer:
        folder = Path(path)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(tokenizer, config, _read_chat_template(folder, config))

    def _register_special_tokens(self, texts: list[str]) -> None:
        # Named special tokens that the vocabulary lacks, or holds as ordinary added tokens,
        # become special (never split, skipped by skip_special_tokens), as in transformers.
        added = self._tok.get_added_tokens_decoder()
        missing = []
        for text in texts:
            tid = self._tok.token_to_id(text)
            if tid is None or (tid in added and not added[tid].special):
                missing.append(AddedToken(text, special=True, normalized=False))
        if missing:
            self._tok.add_special_tokens(missing)

    def _find_byte_fallback_ids(self) -> frozenset[int]:
        # A ByteFallback decoder turns a run of "<0xNN>" tokens into text as a whole: valid
        # UTF-8, or one U+FFFD per byte. The incremental detokenizer must know these tokens.
        decoder = self._tok.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():  # its JSON form
            return frozenset()
        return frozenset(i for t, i in self._tok.get_vocab().items() if _BYTE_PIECE.fullmatch(t))

    # ---- text <-> ids ----

    # Through encode_batch, which gives the same ids as encode but runs without the GIL
    # (encode holds it: another thread stalled 1.4 s while 2 MB were tokenized; 44 ms with
    # encode_batch; bench/cpu_probes.py, docs/benchmarks.md),
    # so that tokenizing a long prompt stops neither the step loop nor a server's event loop.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus each token's (start, end) character offsets in text (transformers' offset_mapping)."""
        enc = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def decode_raw(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """decode without clean_up_tokenization_spaces: the cleanup is not stable under
        appending tokens, so the incremental detokenizer works on this."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat ----

    @property
    def chat_template(self) -> str | None:
        template = self._chat_template
        if isinstance(template, dict):  # several named templates: "default" is the chat one
            return template.get("default")
        return template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for messages, equal to transformers' apply_chat_template(tokenize=False).

        Raises InvalidParameterError("messages", ...) when there is no template, no message, or
        the template rejects the conversation (its raise_exception).
        """
        if self.chat_template is None:
            raise InvalidParameterError("messages", "this model's tokenizer has no chat template")
        if not messages:
            raise InvalidParameterError("messages", "at least one message is required")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **self._special_map
        )

    # ---- vocabulary facts ----

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (len() of a transformers
        tokenizer; its .vocab_size leaves the added tokens out)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        text = self._special_map.get(name)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and extra special tokens, in transformers' order. decode's
        skip_special_tokens skips every added token marked special, which may be more."""
        return list(self._special_ids)


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization: drop the space WordPiece-style decoding puts
    # before punctuation and English contractions. Order matters (" ' " before " 's").
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
