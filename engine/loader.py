"""From what the user passes to from_pretrained to a ModelSpec and weights.

Everything ends up as a transformers-format folder (config.json, safetensors,
tokenizer files): local folders are used as they are, hub ids are looked up in the
local Hugging Face cache (never downloaded), GGUF files are converted once into a
cache folder (engine/gguf_convert.py).

This module must stay cheap to import: a warm start of the default model has to fit in
a few seconds, and importing transformers alone costs ~3 s on a small CPU. So
transformers, gguf and huggingface_hub are imported only on the paths that need them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from engine.default_model import find_default_gguf
from engine.errors import ModelLoadError
from engine.models.rope import SUPPORTED_ROPE_TYPES
from engine.runtime.base import ModelSpec

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# An "org/name" or "name" hub id; anything else that does not exist is a bad path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_model_folder(model: str | os.PathLike | None = None, gguf_file: str | None = None) -> Path:
    """A transformers-format folder for `model`: a checkpoint folder, a .gguf file (or a
    folder plus gguf_file=), a hub id already in the local HF cache, or None/"default"
    for the embedded SmolLM2 model."""
    if model is None or model == "default":
        if gguf_file is not None:
            raise ModelLoadError("gguf_file= needs a model folder or hub id to look in")
        try:
            return _convert(find_default_gguf())
        except FileNotFoundError as e:
            raise ModelLoadError(f"the default model is unavailable: {e}") from None
    path = Path(model).expanduser()
    if path.exists():
        return _local(path, gguf_file)
    name = os.fspath(model)
    if _REPO_ID.match(name) and ".." not in name:
        return _from_hf_cache(name, gguf_file)
    raise ModelLoadError(f"model path {path} does not exist")


def _convert(gguf_path: Path) -> Path:
    from engine.gguf_convert import cached_conversion  # pulls in gguf/transformers only when converting

    return cached_conversion(gguf_path)


def _local(path: Path, gguf_file: str | None) -> Path:
    if path.is_file():
        if path.suffix != ".gguf" or gguf_file is not None:
            raise ModelLoadError(f"{path} is a file; pass a model folder, or a .gguf file without gguf_file=")
        return _convert(path)
    if gguf_file is not None:
        target = path / gguf_file
        if not target.is_file():
            raise ModelLoadError(f"gguf_file {gguf_file!r} not found in {path}")
        return _convert(target)
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _convert(ggufs[0])
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); choose one with gguf_file=")
    raise ModelLoadError(f"{path} has no config.json and no .gguf file; it is not a model folder")


def _from_hf_cache(repo_id: str, gguf_file: str | None) -> Path:
    # try_to_load_from_cache only reads the cache folder; it never touches the network.
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    filename = gguf_file or "config.json"
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except HFValidationError:
        found = None
    if isinstance(found, str):
        return _convert(Path(found)) if gguf_file else Path(found).parent
    raise ModelLoadError(
        f"{repo_id!r} is neither a local path nor a model in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}, no {filename}); textgen never downloads models, so fetch it "
        f"first (e.g. `hf download {repo_id}`) or pass a folder"
    )


def load_spec(folder: str | os.PathLike) -> ModelSpec:
    """Read config.json (by hand, without transformers) into a ModelSpec."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; it is not a transformers checkpoint")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    try:
        return spec_from_config(config)
    except KeyError as e:
        raise ModelLoadError(f"{path} lacks the field {e.args[0]!r}") from None
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def spec_from_config(config: dict) -> ModelSpec:
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        named = f" ({', '.join(config['architectures'])})" if config.get("architectures") else ""
        raise ModelLoadError(
            f"unsupported architecture {arch!r}{named}; textgen serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {config['hidden_act']!r}; only silu is implemented")
    heads = config["num_attention_heads"]
    theta, scaling = _rope(config)
    return ModelSpec(
        architecture=arch,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        # qwen2 always has q/k/v biases; llama may have them (and on o_proj) by flag.
        attention_bias=True if arch == "qwen2" else config.get("attention_bias", False),
        mlp_bias=config.get("mlp_bias", False),
        rope_scaling=scaling,
        sliding_window=_sliding_window(arch, config),
    )


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config style: transformers 5's
    rope_parameters, or the older rope_theta plus rope_scaling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    else:
        params = config.get("rope_scaling") or {}
        theta = config.get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial rotary embeddings (partial_rotary_factor) are not supported")
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    needed = {"linear": ["factor"], "dynamic": ["factor"],
              "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    missing = [k for k in needed[kind] if k not in scaling]
    if missing:
        raise ModelLoadError(f"rope type {kind!r} lacks {', '.join(missing)}")
    return float(theta), scaling


def _sliding_window(arch: str, config: dict) -> int | None:
    if arch == "mistral":
        return config.get("sliding_window")
    if arch == "qwen2" and config.get("use_sliding_window"):
        # qwen2 slides only in layers >= max_window_layers; one window for all layers is
        # all the runtime implements.
        window_layers = config.get("max_window_layers", 0)
        kinds = config.get("layer_types") or [
            "sliding_attention" if i >= window_layers else "full_attention"
            for i in range(config["num_hidden_layers"])
        ]
        if all(k == "sliding_attention" for k in kinds):
            return config.get("sliding_window")
        if any(k == "sliding_attention" for k in kinds):
            raise ModelLoadError("qwen2 with sliding window on only some layers is not supported")
    return None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder} lacks shards listed in its index: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(other)}: only safetensors weights are supported)" if other else ""
        raise ModelLoadError(f"{folder} has no .safetensors weights{hint}")
    return files


def load_weights(folder: str | os.PathLike, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF parameter name -> tensor in `dtype`, read with safetensors (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read weights file {path}: it is corrupt or truncated ({e})") from None
    return weights
