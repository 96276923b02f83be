"""Reads one tensor-parallel rank's weights straight from the safetensors files.

safe_open's get_slice reads only the requested rows or columns from the memory-mapped
file, so a rank never materialises a full q/k/v/o/gate/up/down matrix: peak memory per
rank is its shard plus the replicated tensors (sharding.py says which).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine import loader
from engine.errors import ModelLoadError
from engine.parallel.sharding import shard_plan, slice_rule
from engine.runtime.base import ModelSpec


def load_shard(folder: str | os.PathLike, spec: ModelSpec, rank: int, world_size: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF parameter name -> this rank's slice of it, in `dtype` (like loader.load_weights)."""
    from safetensors import SafetensorError, safe_open

    plan = shard_plan(spec, rank, world_size)
    weights: dict[str, torch.Tensor] = {}
    for path in loader.weight_files(Path(folder)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor = _read(f.get_slice(name), slice_rule(name, spec, plan), rank)
                    weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read weights file {path}: it is corrupt or truncated ({e})") from None
    return weights


def _read(part, rule: tuple, rank: int) -> torch.Tensor:
    kind = rule[0]
    if kind == "rows":
        return part[rule[1] : rule[2]]
    if kind == "cols":
        return part[:, rule[1] : rule[2]]
    if kind == "rank0" and rank != 0:
        # Zeros rather than absent: an mlp_bias model requires down_proj.bias on every rank.
        # (float32 here; load_shard casts it to the model dtype like every other tensor).
        return torch.zeros(part.get_shape())
    return part[:]
