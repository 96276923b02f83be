from __future__ import annotations

import pytest

from tests.checkpoints import TINY_CONFIGS, make_tiny_checkpoint

# Server fixtures (tiny_server, default_server) for tests/service and tests/clients.
pytest_plugins = ("tests.servers",)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """kind -> folder of a tiny random checkpoint, for every kind in TINY_CONFIGS."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_checkpoint(kind, root / kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def default_model_folder(tmp_path_factory):
    """The embedded default model (SmolLM2-135M GGUF) converted once per session.

    The conversion goes to a session temp cache, so no stale conversion from an older
    converter is tested, unless TEXTGEN_CACHE_DIR is already set (reuse across runs
    when iterating locally). The variable stays set for the session, so every later
    from_pretrained() of the default model, in this process or a child, reuses it.
    """
    import os

    from engine.loader import resolve_model_folder

    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("TEXTGEN_CACHE_DIR"):
            mp.setenv("TEXTGEN_CACHE_DIR", str(tmp_path_factory.mktemp("textgen-cache")))
        yield resolve_model_folder(None)
