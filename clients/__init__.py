"""Python clients of the textgen gRPC API. They depend on the generated stubs alone
(and torch, for RemoteModelForCausalLM), never on engine/ or service/.

    from clients import TextGenerationClient
    print(TextGenerationClient("127.0.0.1:50051").generate("Hello", max_new_tokens=16).text)

Names are imported lazily, so that using a client does not import torch.
"""

import importlib

_EXPORTS = {
    "TextGenerationClient": "clients.sync_client",
    "AsyncTextGenerationClient": "clients.async_client",
    "RemoteModelForCausalLM": "clients.remote_model",
    "TextGenerationError": "clients.errors",
    "GenerationResult": "clients.results",
    "Sequence": "clients.results",
    "StreamChunk": "clients.results",
    "TokenizeResult": "clients.results",
    "ModelInfo": "clients.results",
    "Usage": "clients.results",
    "TokenLogprob": "clients.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
