"""Write a tiny checkpoint as a GGUF file the way llama.cpp lays one out.

Lets conversion tests run in a second instead of the default model's half a minute,
and checks our un-permutation of Q/K rows against an independent forward permutation
(llama.cpp's convention: per head, rows (2, head_dim/2) are stored transposed as
(head_dim/2, 2)).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# HF layer parameter -> GGUF tensor kind.
_KINDS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in _GLOBALS:
        return _GLOBALS[hf]
    _, _, layer, *rest = hf.split(".")  # model.layers.N.<module...>.<weight|bias>
    return f"blk.{layer}.{_KINDS['.'.join(rest[:-1])]}.{rest[-1]}"


def _byte_tokens() -> list[str]:
    # GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest are
    # shifted to code points from 256 on.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return [table[b] for b in range(256)]


def write_tiny_gguf(checkpoint: Path, dest: Path, arch: str, quantize_embeddings: bool = True) -> Path:
    """checkpoint: a tiny HF folder (tests/checkpoints.py); arch: "llama" or "qwen2"."""
    config = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(checkpoint / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(dest), arch)
    writer.add_name("tiny")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_tokens(), "ab", "abc"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    # Two merges: transformers reads a one-element GGUF array back as a scalar.
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    for hf, tensor in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            tensor = llama_cpp_permute(tensor, heads if ".attn_q." in name else kv_heads)
        data = tensor.numpy().astype(np.float32)
        if quantize_embeddings and name == "token_embd.weight":
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
