"""IncrementalDetokenizer: complete characters only, stop strings never shown, same text as decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models

from engine.detokenizer import DetokenizerStep, IncrementalDetokenizer
from engine.tokenizer import TextTokenizer
from tests.engine.text_fixtures import text_tokenizer

# In this vocabulary ids 0-16 are special tokens and 17-251 single bytes (half of them
# pieces of multibyte characters); uniform ids alone would rarely hit either.
TOKEN_IDS = st.one_of(st.integers(0, 16), st.integers(17, 251), st.integers(0, 49151))
MIXED_TEXT = "Hi 😀! 你好世界, naïve café 👨‍👩‍👧 𝔘𝔫𝔦 and ❤️ in 日本語のテキスト.\n"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return text_tokenizer()


def run(tok, ids, stops=(), skip_special_tokens=True):
    """Push ids until a stop; return (deltas, the steps, ids pushed, flush text)."""
    detok = IncrementalDetokenizer(tok, tuple(stops), skip_special_tokens)
    steps, pushed = [], []
    for token_id in ids:
        pushed.append(token_id)
        steps.append(detok.push(token_id))
        if steps[-1].stopped:
            break
    tail = detok.flush()
    assert detok.text == "".join(s.text for s in steps) + tail
    return [s.text for s in steps], steps, pushed, tail


def reference(tok, ids, stops, skip_special_tokens=True):
    """decode of everything pushed, cut at the earliest stop-string occurrence."""
    text = tok.decode(ids, skip_special_tokens)
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


# ---- multibyte characters split across tokens ----


@pytest.mark.parametrize("text", ["Hi 😀!", "你好世界", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "👨‍👩‍👧", "I ❤️ you", MIXED_TEXT])
def test_split_characters_are_held_until_complete(tok, text):
    ids = tok.encode(text)
    # Meaningful only if some character really is split: a token alone decodes to U+FFFD.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, _, _, tail = run(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text
    assert tail == ""  # the text ends on a complete character: nothing left for flush


def test_release_happens_on_the_completing_token(tok):
    ids = tok.encode("Hi 😀!")  # "Hi", " " + 2 bytes of 😀, its last 2 bytes, "!"
    assert len(ids) == 4
    deltas, _, _, _ = run(tok, ids)
    assert deltas == ["Hi", " ", "😀", "!"]


def test_incomplete_character_at_the_end_comes_out_as_decode_shows_it(tok):
    ids = tok.encode("界")  # three single-byte tokens
    assert len(ids) == 3
    deltas, _, _, tail = run(tok, ids[:2])
    assert deltas == ["", ""]
    assert tail == tok.decode(ids[:2]) and "\ufffd" in tail


def test_decoding_window_stays_small(tok, monkeypatch):
    """Per-token cost does not grow with the sequence: only a few recent tokens are decoded."""
    sizes = []
    decode_raw = tok.decode_raw

    def counting_decode_raw(ids, skip_special_tokens=False):
        sizes.append(len(ids))
        return decode_raw(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode_raw", counting_decode_raw)
    ids = tok.encode(MIXED_TEXT * 60)
    assert len(ids) > 2000
    deltas, _, _, tail = run(tok, ids)
    assert "".join(deltas) + tail == MIXED_TEXT * 60
    assert max(sizes) <= 8
    assert len(sizes) <= 2 * len(ids) + 1


# ---- stop strings ----


def test_stop_string_spanning_tokens_is_never_emitted(tok):
    text = "Hello world, stop here please"
    ids = tok.encode(text)
    deltas, steps, pushed, tail = run(tok, ids, ["p here"])
    released = ""
    for d in deltas:
        released += d
        assert "Hello world, sto".startswith(released)  # nothing of "p here" ever shows
    assert released == "Hello world, sto" and tail == ""
    assert steps[-1] == DetokenizerStep(steps[-1].text, True, "p here")
    assert tok.decode(pushed) == "Hello world, stop here"  # stopped on the token completing it


def test_stop_string_ending_inside_a_token(tok):
    deltas, steps, pushed, _ = run(tok, tok.encode("Hello world again"), ["wor"])
    assert "".join(deltas) == "Hello "
    assert steps[-1].stopped and tok.decode(pushed) == "Hello world"  # " world" stays in the sequence


def test_stop_string_inside_a_split_character(tok):
    ids = tok.encode("stop 界 here")
    deltas, steps, pushed, _ = run(tok, ids, ["界"])
    assert "".join(deltas) == "stop " and steps[-1].stop_string == "界"
    assert pushed == ids[:4]  # "stop", " " + first byte, second byte, third byte


def test_earliest_stop_string_wins(tok):
    deltas, steps, _, _ = run(tok, tok.encode("Hello world"), ["world", "lo w"])
    assert "".join(deltas) == "Hel" and steps[-1].stop_string == "lo w"


def test_held_back_stop_prefix_is_released_by_flush_or_by_divergence(tok):
    deltas, steps, _, tail = run(tok, tok.encode("go here"), ["here!"])
    assert "".join(deltas) == "go " and tail == "here" and not steps[-1].stopped
    deltas, _, _, tail = run(tok, tok.encode("go here, then"), ["here!"])
    assert "".join(deltas) == "go here, then" and tail == ""


def test_special_tokens_skipped_or_shown(tok):
    ids = tok.encode("a<|im_end|>b")
    assert run(tok, ids, skip_special_tokens=True)[0] == ["a", "", "b"]
    deltas, steps, _, _ = run(tok, ids, ["<|im_end|>"], skip_special_tokens=False)
    assert "".join(deltas) == "a" and steps[-1].stop_string == "<|im_end|>"


def test_after_a_stop(tok):
    detok = IncrementalDetokenizer(tok, ("b",))
    detok.push(tok.encode("a")[0])
    assert detok.push(tok.encode("b")[0]).stopped
    assert detok.flush() == "" and detok.text == "a" and detok.stop_string == "b"
    with pytest.raises(RuntimeError):
        detok.push(tok.encode("c")[0])


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(tok, ("x", ""))


# ---- properties: deltas + flush == decode cut at the first stop string ----


def stop_strings_for(text: str):
    """0-3 stop strings: pieces of text (so they hit) or short random strings."""
    piece = (
        st.tuples(st.integers(0, max(len(text) - 1, 0)), st.integers(1, 6)).map(lambda p: text[p[0] : p[0] + p[1]])
        if text
        else st.just("x")
    )
    return st.lists(st.one_of(piece, st.text(min_size=1, max_size=3)), max_size=3).map(
        lambda stops: [s for s in stops if s]
    )


def check_against_reference(tok, ids, stops, skip):
    deltas, steps, pushed, tail = run(tok, ids, stops, skip)
    expected = reference(tok, pushed, stops, skip)
    assert "".join(deltas) + tail == expected
    for d in deltas:
        assert not any(s in d for s in stops)
    if any("\ufffd" in s for s in stops):
        return deltas  # such a stop string can wait for the character the U+FFFD may become
    full = tok.decode(pushed, skip)
    # Stopped exactly when a stop string is in the text, on the token that completed it.
    assert (bool(steps) and steps[-1].stopped) == any(s in full for s in stops)
    if steps and steps[-1].stopped:
        assert full[len(expected) :].startswith(steps[-1].stop_string)
        assert not any(s in tok.decode(pushed[:-1], skip) for s in stops)
    return deltas


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKEN_IDS, max_size=30), st.booleans(), st.data())
def test_random_ids_match_decode(ids, skip, data):
    tok = text_tokenizer()
    stops = data.draw(stop_strings_for(tok.decode(ids, skip)))
    check_against_reference(tok, ids, stops, skip)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.data())
def test_random_text_round_trips_without_broken_characters(text, data):
    tok = text_tokenizer()
    stops = data.draw(stop_strings_for(text))
    ids = tok.encode(text)
    deltas = check_against_reference(tok, ids, stops, skip=False)
    # Characters the byte alphabet lacks (unassigned code points) decode to U+FFFD; others
    # round-trip, and then no delta may show a character half-done.
    if "\ufffd" not in tok.decode(ids):
        assert all("\ufffd" not in d for d in deltas)


# A SentencePiece-style tokenizer (Llama's decoder: "▁" is a space, byte-fallback tokens,
# one leading space stripped from the text) checks the left-context part of the window:
# decoded alone, a token would lose its leading space.
_SP_VOCAB = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "▁", "!", "ing", "<0xE2>", "<0x82>", "<0xAC>", "<0x41>"]


@pytest.fixture(scope="module")
def sp_tok() -> TextTokenizer:
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(_SP_VOCAB)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return TextTokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"})


def test_sentencepiece_spaces_survive_the_window(sp_tok):
    ids = [3, 2, 2, 4, 6]  # ▁Hello </s> </s> ▁world !
    deltas, _, _, tail = run(sp_tok, ids, skip_special_tokens=True)
    assert deltas == ["Hello", "", "", " world", "!"] and tail == ""
    assert sp_tok.decode(ids, skip_special_tokens=True) == "Hello world!"


def test_byte_fallback_run_waits_for_its_end(sp_tok):
    # The decoder shows a byte run as a whole: "A€" is valid, but "A" + a lone 0xE2 is
    # U+FFFD for each byte, "A" included. So nothing of a run is released before it ends.
    valid = [11, 8, 9, 10, 6]  # <0x41> <0xE2><0x82><0xAC> !
    assert run(sp_tok, valid)[0] == ["", "", "", "", "A€!"]
    broken = [11, 8, 6]  # <0x41> <0xE2> !
    assert sp_tok.decode(broken) == "\ufffd\ufffd!"
    assert run(sp_tok, broken)[0] == ["", "", "\ufffd\ufffd!"]
    # The run's end is known only at flush when the sequence ends inside it.
    assert run(sp_tok, [11, 8]) == ([""] * 2, [DetokenizerStep("")] * 2, [11, 8], "\ufffd\ufffd")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(_SP_VOCAB) - 1), max_size=20), st.booleans(), st.data())
def test_sentencepiece_random_ids_match_decode(sp_tok, ids, skip, data):
    stops = data.draw(stop_strings_for(sp_tok.decode(ids, skip)))
    deltas, _, pushed, tail = run(sp_tok, ids, stops, skip_special_tokens=skip)
    assert "".join(deltas) + tail == reference(sp_tok, pushed, stops, skip)
    assert not any(s in d for d in deltas for s in stops)
