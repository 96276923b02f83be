"""engine.loader: resolving what from_pretrained gets, config parsing, weights, GGUF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import gguf_convert, loader
from engine.errors import ModelLoadError
from tests.engine.tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(path))
    return path


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# --- errors ---------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.resolve_model_folder(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.load_spec(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        loader.resolve_model_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        loader.load_spec(tmp_path)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'gpt2' \(GPT2LMHeadModel\)"):
        loader.load_spec(tmp_path)


def test_unsupported_rope_type(tmp_path, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported rope type 'yarn'"):
        loader.load_spec(tmp_path)


def test_old_style_rope_config(tmp_path, tiny_checkpoints):
    """transformers 4 configs: rope_theta at top level and rope_scaling with "type"."""
    config = json.loads((tiny_checkpoints["llama3-rope"] / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert loader.load_spec(tmp_path) == loader.load_spec(tiny_checkpoints["llama3-rope"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path, tiny_llama, damage):
    folder = copy_checkpoint(tiny_llama, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07not a safetensors file")
    loader.load_spec(folder)  # the config is fine
    with pytest.raises(ModelLoadError, match="model.safetensors: it is corrupt or truncated"):
        loader.load_weights(folder, torch.float32)


def test_no_safetensors(tmp_path, tiny_llama):
    folder = copy_checkpoint(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        loader.load_weights(folder, torch.float32)


def test_checkpoint_missing_a_tensor(tmp_path, tiny_llama):
    from engine.runtime.torch_runtime import TorchRuntime

    folder = copy_checkpoint(tiny_llama, tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    spec = loader.load_spec(folder)
    with pytest.raises(ModelLoadError, match="incomplete llama checkpoint: checkpoint lacks model.layers.1.mlp.up_proj"):
        TorchRuntime(spec, loader.load_weights(folder, torch.float32), torch.float32, "cpu")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="'someorg/some-model' is neither a local path nor a model in the local"):
        loader.resolve_model_folder("someorg/some-model")


# --- sources that work ----------------------------------------------------------------


def test_hub_id_in_cache_resolves_to_snapshot(tmp_path, monkeypatch, tiny_llama):
    from huggingface_hub import constants

    # The hub cache layout: refs/main names the commit whose snapshot holds the files.
    repo = tmp_path / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = copy_checkpoint(tiny_llama, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert loader.resolve_model_folder("someorg/tiny") == snapshot
    assert loader.load_spec(snapshot).architecture == "llama"


def test_sharded_checkpoint(tmp_path, tiny_llama):
    weights = load_file(tiny_llama / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / file)
        weight_map |= {k: file for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = loader.load_weights(folder, torch.float32)
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="lacks shards"):
        loader.load_weights(folder, torch.float32)


def test_load_weights_casts_dtype(tiny_llama):
    weights = loader.load_weights(tiny_llama, torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


# --- GGUF conversion ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_conversion_restores_checkpoint(kind, tmp_path, cache_dir, tiny_checkpoints):
    """Write a checkpoint as llama.cpp would (Q/K rows permuted for llama, embeddings in
    Q8_0), convert it back, and get the original tensors (the embedding as dequantized)."""
    path = write_tiny_gguf(tiny_checkpoints[kind], tmp_path / f"{kind}.gguf", kind)
    folder = loader.resolve_model_folder(path)
    assert folder.parent == cache_dir / "converted"
    ours = load_file(folder / "model.safetensors")
    original = load_file(tiny_checkpoints[kind] / "model.safetensors")
    assert set(ours) == set(original)
    for name, tensor in ours.items():
        if name == "model.embed_tokens.weight":
            q8 = gguf.quants.quantize(original[name].numpy(), gguf.GGMLQuantizationType.Q8_0)
            expected = torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))
        else:
            expected = original[name]
        assert torch.equal(tensor, expected), name
    # transformers' own GGUF loader reads the same tensors.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    spec = loader.load_spec(folder)
    assert spec.architecture == kind and spec.tie_word_embeddings == (kind == "qwen2")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)


def test_gguf_in_folder_with_gguf_file(tmp_path, cache_dir, tiny_llama):
    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny.gguf", "llama")
    by_file = loader.resolve_model_folder(path)
    assert loader.resolve_model_folder(tmp_path, gguf_file="tiny.gguf") == by_file
    assert loader.resolve_model_folder(tmp_path) == by_file  # the folder's only GGUF
    with pytest.raises(ModelLoadError, match="gguf_file 'other.gguf' not found"):
        loader.resolve_model_folder(tmp_path, gguf_file="other.gguf")


def test_failed_conversion_leaves_no_cache(tmp_path, cache_dir, tiny_llama, monkeypatch):
    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny.gguf", "llama")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        loader.resolve_model_folder(path)
    assert list((cache_dir / "converted").iterdir()) == []  # no half-written folder, no temp dir
    monkeypatch.undo()
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(cache_dir))
    assert (loader.resolve_model_folder(path) / "model.safetensors").is_file()


def test_unsupported_gguf_architecture(tmp_path, cache_dir):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        loader.resolve_model_folder(tmp_path / "x.gguf")


def test_default_model_conversion_is_reused(default_model_folder, monkeypatch):
    files = sorted(default_model_folder.iterdir())
    before = {f: f.stat().st_mtime_ns for f in files}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "convert", no_conversion)
    assert loader.resolve_model_folder(None) == default_model_folder
    assert loader.resolve_model_folder("default") == default_model_folder
    assert {f: f.stat().st_mtime_ns for f in sorted(default_model_folder.iterdir())} == before


def test_warm_start_does_not_import_transformers(default_model_folder):
    """importing transformers alone costs ~3 s; the warm path must not pay it."""
    code = (
        "import sys, torch\n"
        "from engine import loader\n"
        "from engine.runtime.torch_runtime import TorchRuntime\n"
        "folder = loader.resolve_model_folder(None)\n"
        "runtime = TorchRuntime(loader.load_spec(folder), loader.load_weights(folder, torch.float32),"
        " torch.float32, 'cpu')\n"
        "runtime.init_kv_cache(8, 16)\n"
        "heavy = [m for m in ('transformers', 'gguf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fp8_kv_cache_is_refused_off_the_cuda_runtime(tiny_llama):
    from engine.factory import load_model

    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' needs the CUDA runtime"):
        load_model(str(tiny_llama), device="cpu", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'fp8'"):
        load_model(str(tiny_llama), device="cpu", kv_cache_dtype="int8")
