"""The default model's tokenizer, loaded both ways, shared by the text-layer tests.

Cached per process: writing the files converts the GGUF tokenizer (seconds) and
transformers' AutoTokenizer takes a few seconds more to import and load.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

from engine.tokenizer import TextTokenizer
from tests.checkpoints import save_tokenizer

_dirs: list[tempfile.TemporaryDirectory] = []  # kept alive until the process exits


def new_dir() -> Path:
    d = tempfile.TemporaryDirectory(prefix="textgen-text-")
    _dirs.append(d)
    return Path(d.name)


@functools.lru_cache(maxsize=1)
def tokenizer_folder() -> Path:
    folder = new_dir()
    save_tokenizer(folder)
    return folder


def variant_folder(config_changes: dict, chat_template: str | None = None, drop_jinja: bool = False) -> Path:
    """A copy of the default tokenizer folder with tokenizer_config.json / chat template changed."""
    folder = new_dir()
    for f in tokenizer_folder().iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if drop_jinja:
        (folder / "chat_template.jinja").unlink()
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    return folder


@functools.lru_cache(maxsize=1)
def text_tokenizer() -> TextTokenizer:
    return TextTokenizer.from_folder(tokenizer_folder())


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder()))
