"""The CUDA runtime: Triton decode kernels, CUDA-graph decode, FP8 weights.

Importing this package is cheap; `engine.runtime.cuda.runtime` needs Triton and is
imported only when a CUDA device is used.
"""

from __future__ import annotations

import importlib.util

import torch


def available() -> bool:
    """A CUDA device and Triton are both present."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
