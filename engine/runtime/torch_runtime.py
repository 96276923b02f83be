"""ModelRuntime over our own torch Llama-family decoder and a paged KV cache."""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.models import MissingWeightError, build_model
from engine.runtime.attention import build_metadata
from engine.runtime.base import ForwardBatch, ModelRuntime, ModelSpec
from engine.runtime.kv_copy import copy_kv_blocks

logger = logging.getLogger(__name__)


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmuls need compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class TorchRuntime(ModelRuntime):
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, use_fp8: bool = False, group=None):
        # group: the tensor-parallel process group when spec and weights are one rank's
        # shard (engine/parallel/); None for a whole model.
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.fp8_enabled = False
        if use_fp8:
            if not fp8_supported(self.device):
                logger.warning("FP8 is unavailable on this device (%s); running in %s instead",
                               self._device_name(), str(dtype).removeprefix("torch."))
            else:
                # FP8 HOOK: Hopper/Ada FP8 weights and KV cache are a later issue. Until
                # then say so loudly rather than pretend.
                logger.warning("FP8 is not implemented yet in textgen's torch runtime; running in %s instead",
                               str(dtype).removeprefix("torch."))
        try:
            with torch.inference_mode():
                self.model = build_model(spec, weights, dtype, self.device, group=group)
        except MissingWeightError as e:
            raise ModelLoadError(f"incomplete {spec.architecture} checkpoint: {e.args[0]}") from None
        self.block_size = 0
        self.kv_cache: torch.Tensor | None = None
        self._layer_caches: list[torch.Tensor] = []

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            return f"{torch.cuda.get_device_name(self.device)}, compute capability {major}.{minor}"
        return self.device.type

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        s = self.spec
        per_token = 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim
        return per_token * block_size * self.dtype.itemsize

    def num_kv_blocks(self, config: EngineConfig, max_model_len: int | None = None) -> int:
        """KV blocks that fit the memory budget: a fraction of free CUDA memory (measured
        after the weights are loaded), or EngineConfig.kv_cache_bytes on CPU. Capped at
        what max_num_seqs sequences of max_model_len tokens could ever use."""
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.kv_cache_memory_fraction)
        else:
            budget = config.kv_cache_bytes
        blocks = budget // self.kv_cache_bytes_per_block(config.block_size)
        if max_model_len is not None:
            blocks = min(blocks, config.max_num_seqs * -(-max_model_len // config.block_size))
        return max(1, blocks)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        s = self.spec
        # One tensor for all layers: copy_blocks is then a single indexed copy, and each
        # layer's cache ([blocks, block_size, keys | values, head_dim], see attention.py)
        # is a contiguous view.
        self.kv_cache = torch.zeros(
            s.num_hidden_layers, num_blocks, block_size, 2 * s.num_key_value_heads, s.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.block_size = block_size
        self._layer_caches = list(self.kv_cache)

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("init_kv_cache() must be called before execute()")
        with torch.inference_mode():
            meta = build_metadata(batch, self.block_size, self.spec.sliding_window, self.dtype)
            logits = self.model.forward(batch.input_ids, batch.positions, batch.logits_indices,
                                        self._layer_caches, meta)
            return logits.float()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        copy_kv_blocks(self.kv_cache, pairs)
