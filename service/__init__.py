"""The gRPC face of the engine: `python -m service --model PATH|default`.

servicer.py (thin RPC methods) -> convert.py (protobuf <-> engine types) and
errors.py (engine exceptions -> gRPC status); server.py starts, serves and drains.
"""
