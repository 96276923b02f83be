"""Package for the `textgen.v1` protos."""
