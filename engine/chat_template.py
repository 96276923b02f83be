"""Render a Hugging Face chat template the way transformers does.

Same jinja2 setup as transformers' apply_chat_template: an immutable sandbox (templates
come with downloaded models), trim_blocks + lstrip_blocks, loop controls, a `tojson`
that does not HTML-escape, and the raise_exception / strftime_now helpers. The
`{% generation %}` tag (transformers uses it to find assistant tokens) renders its body.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InvalidParameterError


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders as its body alone."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiled once per template text; raises jinja2.TemplateSyntaxError for a broken one."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **special_tokens: str
) -> str:
    """special_tokens: bos_token=..., eos_token=..., as transformers passes its special_tokens_map.

    A template error (a syntax error, or the template's raise_exception on a conversation
    it does not accept) is the request's fault: InvalidParameterError("messages", ...).
    """
    try:
        return compile_chat_template(template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidParameterError("messages", f"chat template: {exc}") from exc
