"""python -m clients "prompt" [--stream] [--max-new-tokens N] [--target HOST:PORT] ..."""

from __future__ import annotations

import argparse
import sys

from clients.errors import TextGenerationError
from clients.sync_client import TextGenerationClient


def main(argv=None) -> int:
    # No abbreviations: `--auth-token SECRET` must fail, not pass as --auth-token-file.
    parser = argparse.ArgumentParser(
        prog="python -m clients", description="Generate text with a textgen server.", allow_abbrev=False
    )
    parser.add_argument("prompt")
    parser.add_argument("--target", default=None, help="host:port; default: $TEXTGEN_TARGET or 127.0.0.1:50051")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are made")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--do-sample", action="store_true", default=None)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="seconds before the request is given up")
    security = parser.add_argument_group(
        "security", "the bearer token comes from --auth-token-file or $TEXTGEN_AUTH_TOKEN, never the command line"
    )
    security.add_argument("--tls", action="store_true", help="connect with TLS (the system's CAs unless --tls-ca)")
    security.add_argument("--tls-ca", metavar="PEM", help="CAs that sign the server's certificate (implies --tls)")
    security.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    security.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    security.add_argument("--auth-token-file", metavar="FILE", help="a file holding the bearer token")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    token = None
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            token = f.read().strip() or None

    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    options = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, timeout=args.timeout,
    )  # fmt: skip
    connection = dict(
        tls=args.tls or None, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token
    )
    with TextGenerationClient(args.target, **connection) as client:
        try:
            if args.stream:
                for chunk in client.generate_stream(prompt, **options):
                    print(chunk.text, end="", flush=True)
                print()
            else:
                print(client.generate(prompt, **options).text)
        except TextGenerationError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
