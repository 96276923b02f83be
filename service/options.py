"""Command-line options of `python -m service`.

The engine limits are read off EngineConfig's fields, so a new limit becomes a flag
without an edit here (--block-size, --max-num-seqs, --no-enable-prefix-caching, ...).
"""

from __future__ import annotations

import argparse
import dataclasses

from engine.config import EngineConfig


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine limits (EngineConfig; unset flags keep its defaults)")
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        # Annotations are strings here (postponed evaluation), e.g. "int | None".
        kind = str(field.type)
        help_text = f"default: {field.default}"
        if kind.startswith("bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind.startswith("tuple"):
            group.add_argument(flag, type=_parse_ints, default=None, metavar="N,N,...", help=help_text)
        else:
            number = float if kind.startswith("float") else int
            group.add_argument(flag, type=number, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve a causal LM over gRPC.")
    parser.add_argument("--model", default="default", help='a checkpoint folder, a GGUF file, or "default"')
    # Loopback by default: exposing the model is a deliberate choice (--host 0.0.0.0).
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port (logged)")
    parser.add_argument("--use-fp8", action="store_true", help="FP8 weights where the device supports them")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]; default: the engine's choice")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ...; default: the engine's choice")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--drain-grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may run before they are cancelled",
    )
    parser.add_argument("--log-level", default="INFO")
    _add_engine_flags(parser)
    return parser


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields given on the command line, by name."""
    names = (field.name for field in dataclasses.fields(EngineConfig))
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
