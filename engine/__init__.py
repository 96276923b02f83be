"""textgen's inference engine: transformers' generate() API over continuous batching.

Names are imported lazily, so that `import engine.block_manager` (tests, tools)
does not load the model stack.
"""

import importlib

_EXPORTS = {
    "AsyncEngine": "engine.async_engine",
    "EngineStats": "engine.model_info",
    "ModelInfo": "engine.model_info",
    "EngineConfig": "engine.config",
    "AutoModelForCausalLM": "engine.modeling",
    "CausalLM": "engine.modeling",
    "ContextLengthError": "engine.errors",
    "EngineDeadError": "engine.errors",
    "InvalidParameterError": "engine.errors",
    "ModelLoadError": "engine.errors",
    "QueueFullError": "engine.errors",
    "RequestFailedError": "engine.errors",
    "FinishReason": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SequenceOutput": "engine.outputs",
    "TokenLogprob": "engine.outputs",
    "GenerationRequest": "engine.params",
    "SamplingParams": "engine.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
