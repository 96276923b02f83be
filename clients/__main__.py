"""python -m clients "prompt" [--stream] [--max-new-tokens N] [--target HOST:PORT] ..."""

from __future__ import annotations

import argparse
import sys

from clients.errors import TextGenerationError
from clients.sync_client import TextGenerationClient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description="Generate text with a textgen server.")
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
    args = parser.parse_args(argv)

    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    options = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, timeout=args.timeout,
    )  # fmt: skip
    with TextGenerationClient(args.target) as client:
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
