"""The textgen.v1 protobuf package; `make proto` generates its stubs beside this file."""
