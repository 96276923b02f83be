"""TextTokenizer gives what transformers' AutoTokenizer gives for the same folder."""

from __future__ import annotations

import subprocess
import sys

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidParameterError, ModelLoadError
from engine.tokenizer import TextTokenizer
from tests.engine.text_fixtures import (
    hf_tokenizer,
    text_tokenizer,
    tokenizer_folder,
    variant_folder,
)

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I ❤️ 🦀 and 👨‍👩‍👧‍👦 and 🇫🇷",
    "你好，世界。日本語のテキストも。한국어",
    "café naïve résumé Ångström e\u0301",
    "a   b\t\t\nc\n\n\n  ",
    "   leading and trailing   ",
    "\u00a0non-breaking\u200bzero\u200dwidth",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more<|im_end|><repo_name>",
    "<|im_",
    "مرحبا بالعالم हिन्दी ภาษาไทย",
    "def f(x):\n    return x ** 2  # square\n",
    "\x00\x01\x7f control",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello 😀"},
        {"role": "assistant", "content": "Hi! 你好"},
        {"role": "user", "content": "  spaces  \n\n"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> TextTokenizer:
    return text_tokenizer()


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_offsets_match_transformers(ours, hf, text, add_special_tokens):
    expected = hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    assert ours.encode(text, add_special_tokens=add_special_tokens) == expected["input_ids"]
    ids, offsets = ours.encode_with_offsets(text, add_special_tokens=add_special_tokens)
    assert ids == expected["input_ids"]
    assert offsets == [tuple(o) for o in expected["offset_mapping"]]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours, hf, text, skip_special_tokens):
    ids = hf.encode(text)
    assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


def test_special_token_facts_match_transformers(ours, hf):
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


# Uses what transformers' renderer adds to plain jinja2: trim_blocks/lstrip_blocks, loop
# controls, the non-escaping tojson, special-token variables, {% generation %}, raise_exception.
FEATURE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if m['content'] == 'skip me' %}{% continue %}{% endif %}
<{{ m['role'] }}>{{ m['content'] | tojson }}
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_chat_template_features_match_transformers():
    import transformers

    folder = variant_folder({}, chat_template=FEATURE_TEMPLATE)
    ours, hf = TextTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [
        {"role": "user", "content": 'say "<b>&" ünï'},
        {"role": "user", "content": "skip me"},
        {"role": "assistant", "content": "ok"},
    ]
    for add in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    bad = [*messages, {"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="no tools here"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(InvalidParameterError, match="no tools here") as info:
        ours.apply_chat_template(bad)
    assert info.value.field == "messages"


def test_inline_chat_template_and_add_bos_token_match_transformers():
    # transformers ignores add_bos_token when tokenizer.json exists: its post-processor rules.
    import transformers

    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    folder = variant_folder({"chat_template": template, "add_bos_token": True}, drop_jinja=True)
    ours, hf = TextTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    for text in ("hello there", ""):
        assert ours.encode(text) == hf.encode(text)


def test_jinja_file_wins_over_inline_template():
    folder = variant_folder({"chat_template": "INLINE"}, chat_template="FILE")
    assert TextTokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "FILE"


def test_chat_errors(ours):
    no_template = TextTokenizer.from_folder(variant_folder({}, drop_jinja=True))
    with pytest.raises(InvalidParameterError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidParameterError, match="at least one message"):
        ours.apply_chat_template([])
    with pytest.raises(ModelLoadError, match="does not compile"):
        TextTokenizer.from_folder(variant_folder({}, chat_template="{% for m in messages %}"))


def test_loading_does_not_import_transformers():
    # The server's warm start depends on it: transformers alone takes seconds to import.
    code = (
        "import sys; from engine.tokenizer import TextTokenizer; import engine.detokenizer, engine.stop; "
        f"t = TextTokenizer.from_folder({str(tokenizer_folder())!r}); t.apply_chat_template([{{'role': 'user', "
        "'content': 'x'}]); assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(_repo_root()))


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_random_text_matches_transformers(text):
    ours, hf = text_tokenizer(), hf_tokenizer()
    expected = hf(text, return_offsets_mapping=True)
    ids, offsets = ours.encode_with_offsets(text)
    assert ids == expected["input_ids"]
    assert offsets == [tuple(o) for o in expected["offset_mapping"]]
    assert ours.decode(ids) == hf.decode(ids)


# In this vocabulary ids 0-16 are special tokens and 17-251 single bytes (half of them
# pieces of multibyte characters); uniform ids alone would rarely hit either.
TOKEN_IDS = st.one_of(st.integers(0, 16), st.integers(17, 251), st.integers(0, 49151))


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKEN_IDS, max_size=20), st.booleans())
def test_random_ids_decode_like_transformers(ids, skip_special_tokens):
    ours, hf = text_tokenizer(), hf_tokenizer()
    assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)
