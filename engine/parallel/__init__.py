"""Tensor parallelism within one host: a model split over N devices (or CPU processes).

sharding.py      which slice of which tensor each rank holds; the KV-head rule
shard_loader.py  reads a rank's slices straight from the safetensors files
group.py         the process group (gloo on CPU, NCCL on CUDA) and its environment
protocol.py      the step plan rank 0 sends its workers
worker.py        a worker process: ranks 1..N-1
tp_runtime.py    TensorParallelRuntime: rank 0, the ModelRuntime the engine sees
"""
