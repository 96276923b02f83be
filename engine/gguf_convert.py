"""One-time conversion of a GGUF file into a transformers-format cache folder.

transformers is used only to read config and tokenizer from the GGUF (and write them
with save_pretrained); the weights are read, dequantized to float32 and renamed here
with the gguf package. The result is cached per GGUF file (path, size, mtime) under
$TEXTGEN_CACHE_DIR/converted (default ~/.cache/textgen/converted), so only the first
start pays for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Bump when the converted folder's contents change, so stale conversions are not reused.
CONVERTER_VERSION = 1
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp files Mistral under "llama"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3.1 files carry their rope scaling as a factor tensor; transformers' GGUF loader
# does not use it either, and the converted config says which rope the model gets.
_IGNORED = {"rope_freqs.weight"}


def cache_root() -> Path:
    base = os.environ.get("TEXTGEN_CACHE_DIR") or Path.home() / ".cache" / "textgen"
    return Path(base).expanduser() / "converted"


def cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = f"{CONVERTER_VERSION}:{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache_root() / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_conversion(gguf_path: Path) -> Path:
    """The converted folder for gguf_path, converting it first if no cache exists."""
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    dest = cache_folder(gguf_path)
    # A folder only ever appears by an atomic rename of a complete conversion.
    if (dest / "config.json").is_file():
        return dest
    logger.info("converting %s into %s (once)", gguf_path, dest)
    convert(gguf_path, dest)
    return dest


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str | None:
    """transformers' parameter name for a GGUF tensor name (None: ignored tensor)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    parts = gguf_name.split(".")  # blk.N.<kind>.<weight|bias>
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows for the llama architecture.

    llama.cpp's rope rotates adjacent pairs, so its converter interleaves each head's two
    rotate-half halves: GGUF row (head, i, j) holds HF row (head, j, i) for i < head_dim/2
    and j in {0, 1}.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_tensors(reader, arch: str, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            logger.warning("ignoring GGUF tensor %s", t.name)
            continue
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_rope_rows(w, heads if ".attn_q." in t.name else kv_heads)
        tensors[name] = w.contiguous()
    return tensors


def _special_tokens(reader) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "padding_token_id", "unk_token_id": "unknown_token_id"}
    found = {}
    for ours, theirs in keys.items():
        value = _field(reader, f"tokenizer.ggml.{theirs}")
        if value is not None:
            found[ours] = int(value)
    return found


def convert(gguf_path: Path, dest: Path) -> None:
    """Write config, generation config, tokenizer and float32 safetensors into dest."""
    import gguf
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path}; textgen converts "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    special = _special_tokens(reader)
    _fix_tokenizer_specials(tokenizer, special)
    config.dtype = torch.float32  # what we write below
    tensors = read_tensors(reader, arch, config.num_attention_heads, config.num_key_value_heads)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation = {k: v for k, v in special.items() if k != "unk_token_id"}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as ~/.cache
        try:
            os.rename(tmp, dest)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            logger.info("%s was converted concurrently; using that copy", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_tokenizer_specials(tokenizer, special: dict[str, int]) -> None:
    # transformers' GGUF tokenizer reader can name the wrong eos token (SmolLM2: it
    # reports <|im_start|>, while the GGUF metadata says id 2, <|im_end|>); the GGUF
    # metadata is authoritative.
    for attr in ("bos", "eos", "pad", "unk"):
        token_id = special.get(f"{attr}_token_id")
        if token_id is not None and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(token_id))
