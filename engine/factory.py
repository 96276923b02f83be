"""Builds a running engine from what the user passes to from_pretrained."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import loader
from engine.config import EngineConfig
from engine.default_model import DEFAULT_MODEL_ID
from engine.engine_loop import EngineLoop
from engine.engine_process import ProcessEngineLoop
from engine.generation_config import resolve_sampling_params
from engine.llm_engine import LLMEngine
from engine.model_info import ModelInfo
from engine.runtime.torch_runtime import TorchRuntime
from engine.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    loop: EngineLoop | ProcessEngineLoop
    info: ModelInfo
    tokenizer: TextTokenizer
    folder: Path
    generation_defaults: dict  # generation_config.json as a dict

    def resolve_params(self, prompt_len: int, generation_config=None, **overrides):
        return resolve_sampling_params(
            self.generation_defaults, generation_config,
            prompt_len=prompt_len, max_model_len=self.info.max_model_len, **overrides,
        )


def pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        # CPUs here have no bf16 arithmetic; GPUs serve bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(model=None, *, use_fp8: bool = False, dtype=None, device=None, gguf_file=None, **options) -> LoadedModel:
    config, unknown = EngineConfig.from_options(**options)
    if unknown:
        raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
    folder = loader.resolve_model_folder(model, gguf_file=gguf_file)
    spec = loader.load_spec(folder)
    tokenizer = TextTokenizer.from_folder(folder)
    gen_path = folder / "generation_config.json"
    defaults = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    loop: EngineLoop | ProcessEngineLoop
    if config.engine_process:
        # Everything that touches weights or the device happens in the child; the figures
        # that depend on the runtime come back in its start report.
        loop = ProcessEngineLoop(functools.partial(build_engine, str(folder), config, use_fp8, dtype, device))
        runtime_dtype, fp8, max_model_len = loop.report.dtype, loop.report.fp8, loop.limits.max_model_len
    else:
        engine = build_engine(folder, config, use_fp8, dtype, device, spec=spec, tokenizer=tokenizer)
        loop = EngineLoop(engine, config.max_in_flight, config.watchdog_timeout_s)
        runtime = engine.runtime
        runtime_dtype = str(runtime.dtype).removeprefix("torch.")
        fp8, max_model_len = bool(getattr(runtime, "fp8_enabled", False)), engine.max_model_len
    default_params = resolve_sampling_params(defaults, None, prompt_len=1, max_model_len=max_model_len)
    info = ModelInfo(
        model_id=str(model) if model not in (None, "default") else DEFAULT_MODEL_ID,
        architecture=spec.architecture,
        dtype=runtime_dtype,
        fp8=fp8,
        max_model_len=max_model_len,
        vocab_size=spec.vocab_size,
        eos_token_ids=default_params.eos_token_ids,
        default_params=default_params,
    )
    return LoadedModel(loop, info, tokenizer, folder, defaults)


def build_engine(folder, config: EngineConfig, use_fp8: bool, dtype, device, spec=None, tokenizer=None) -> LLMEngine:
    """The runtime (weights on the device), its KV pool, warm-up, and the LLMEngine over it.

    Module-level with plain arguments, so that functools.partial of it pickles: with
    engine_process it is the builder that runs in the engine's child process."""
    folder = Path(folder)
    spec = spec if spec is not None else loader.load_spec(folder)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    logger.info("loading %s (%s) on %s in %s", folder, spec.architecture, torch_device, torch_dtype)
    max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
    if config.kv_cache_dtype == "fp8" and not (torch_device.type == "cuda" and config.experimental_cuda_runtime
                                               and config.tensor_parallel_size == 1):
        raise ValueError("kv_cache_dtype: 'fp8' needs the CUDA runtime on one GPU")
    if config.tensor_parallel_size > 1:
        # Imported here: it starts worker processes, and one-rank engines never need it.
        from engine.parallel.tp_runtime import TensorParallelRuntime

        runtime = TensorParallelRuntime(folder, spec, config.tensor_parallel_size, torch_dtype, torch_device,
                                        use_fp8=use_fp8)
    elif torch_device.type == "cuda" and config.experimental_cuda_runtime:
        # Imported here: it needs Triton, which CPU installs lack.
        from engine.runtime.cuda.runtime import CudaRuntime

        runtime = CudaRuntime(spec, loader.load_weights(folder, torch_dtype), torch_dtype, torch_device,
                              use_fp8=use_fp8, config=config, max_model_len=max_model_len)
    else:
        weights = loader.load_weights(folder, torch_dtype)
        runtime = TorchRuntime(spec, weights, torch_dtype, torch_device, use_fp8=use_fp8)
    tokenizer = tokenizer if tokenizer is not None else TextTokenizer.from_folder(folder)

    blocks = runtime.num_kv_blocks(config, max_model_len)
    runtime.init_kv_cache(blocks, config.block_size)
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", blocks, config.block_size,
                blocks * runtime.kv_cache_bytes_per_block(config.block_size) / 2**20)
    if config.capture_graphs_at_start:
        began = time.monotonic()
        runtime.warm_up()  # before the step loop's thread starts using the device
        logger.info("runtime warm-up (CUDA graphs) took %.1f s", time.monotonic() - began)
    return LLMEngine(runtime, tokenizer, config, max_model_len, blocks)
