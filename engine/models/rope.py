"""Rotary position embeddings: inverse frequencies, tables, and their application.

The inverse frequencies follow transformers' formulas operation for operation (same
dtypes, same order) so that fp32 results match its Llama/Mistral/Qwen2 models.

Layout: transformers rotates element i of a head with element i + head_dim/2
("rotate half"). We permute the q/k projection rows once at load time so each such pair
sits side by side (interleave_rope_rows), which lets the rotation run in place on the
q/k part of the fused qkv output, in float32 as a single complex multiply. Attention
only takes dot products of q and k, so permuting both heads' dims alike changes nothing.
"""

from __future__ import annotations

import math

import torch

from engine.runtime.base import ModelSpec

# "dynamic" (NTK) only changes the frequencies for sequences longer than
# max_position_embeddings; the engine never serves beyond that length, so inside it
# the default frequencies are exact.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_type(spec: ModelSpec) -> str:
    scaling = spec.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    # transformers builds the exponent as int64 arange cast to float32, then divides.
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta**exponent)


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies for spec's rope type."""
    kind = rope_type(spec)
    freqs = _base_inv_freq(spec.rope_theta, spec.head_dim)
    if kind in ("default", "dynamic"):
        return freqs
    scaling = spec.rope_scaling
    if kind == "linear":
        return freqs / scaling["factor"]
    if kind == "llama3":
        return _llama3(freqs, scaling)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
    # in between interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def interleave_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder a q or k projection's output rows (weight or bias) per head from
    (half, i) to (i, half), so rotate-half partners i and i + head_dim/2 are adjacent."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class RopeTable:
    """cos/sin per position for the interleaved layout, computed like transformers (angles
    position * inv_freq in float32, cos/sin in float32, then cast to the model dtype)."""

    def __init__(self, spec: ModelSpec, num_positions: int, dtype: torch.dtype, device):
        angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_freq(spec)[None, :]
        cos, sin = angles.cos(), angles.sin()
        # float32 rotates as one complex multiply; other dtypes (bf16 has no complex type)
        # use the real form with transformers' per-op rounding.
        self.complex = dtype == torch.float32
        if self.complex:
            self.table = torch.complex(cos, sin).to(device)  # [P, d/2] complex64
        else:
            self.table = torch.stack([cos, sin]).to(dtype=dtype, device=device)  # [2, P, d/2]

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """Per-token factors for apply(), once per forward pass."""
        if self.complex:
            return self.table[positions].unsqueeze(1)  # [T, 1, d/2]
        return self.table[:, positions].unsqueeze(2)  # [2, T, 1, d/2]

    def apply_(self, x: torch.Tensor, factors: torch.Tensor) -> None:
        """Rotate x [T, heads, head_dim] (interleaved layout) in place.

        Per pair (a, b) with angle t: a' = a cos t - b sin t, b' = b cos t + a sin t, which is
        transformers' x * cos + rotate_half(x) * sin written pairwise.
        """
        pairs = x.unflatten(-1, (-1, 2))
        if self.complex:
            rotated = torch.view_as_complex(pairs)
            rotated.mul_(factors)
            return
        cos, sin = factors[0], factors[1]
        a, b = pairs[..., 0], pairs[..., 1]
        a_sin = a * sin
        a.mul_(cos).sub_(b * sin)
        b.mul_(cos).add_(a_sin)
