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
        elif kind == "str":
            group.add_argument(flag, default=None, help=help_text)
        else:
            number = float if kind.startswith("float") else int
            group.add_argument(flag, type=number, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--auth-token SECRET` must fail, not pass as --auth-token-file.
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve a causal LM over gRPC.", allow_abbrev=False
    )
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
    security = parser.add_argument_group(
        "security",
        "TLS and bearer tokens. Tokens are read from --auth-token-file and/or $TEXTGEN_AUTH_TOKENS "
        "(comma-separated), never from the command line; with neither, calls need no token.",
    )
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    security.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca", metavar="PEM", help="mutual TLS: require client certificates signed by these CAs"
    )
    security.add_argument("--auth-token-file", metavar="FILE", help="accepted bearer tokens, one per line")
    security.add_argument(
        "--auth-health", action="store_true", help="health checks need a token too (by default they are open)"
    )
    _add_engine_flags(parser)
    return parser


def check_security_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_security_options(parser, args)
    return args


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields given on the command line, by name."""
    names = (field.name for field in dataclasses.fields(EngineConfig))
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
