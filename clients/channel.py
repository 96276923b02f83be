"""Channel options shared by the sync and asyncio clients."""

import os

# Mirror the server's limits (service/server.py): requests up to 4 MiB, and unary
# responses up to 16 MiB (many sequences with logprobs), above gRPC's 4 MiB default.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)
DEFAULT_TARGET = "127.0.0.1:50051"


def default_target() -> str:
    """$TEXTGEN_TARGET if set (so scripts need no edit to reach another server), else DEFAULT_TARGET."""
    return os.environ.get("TEXTGEN_TARGET") or DEFAULT_TARGET
