"""Model implementations, chosen by ModelSpec.architecture."""

from __future__ import annotations

import torch

from engine.models.llama import LlamaModel
from engine.models.weights import MissingWeightError
from engine.runtime.base import ModelSpec

# llama, mistral and qwen2 differ only in config (biases, sliding window, tying), which
# LlamaModel reads from the spec and the weights present.
ARCHITECTURES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel}


def build_model(spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                group=None):
    """group: the tensor-parallel process group (engine/parallel/), or None for one rank."""
    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {spec.architecture!r}")
    return ARCHITECTURES[spec.architecture](spec, weights, dtype, device, group=group)


__all__ = ["ARCHITECTURES", "LlamaModel", "MissingWeightError", "build_model"]
