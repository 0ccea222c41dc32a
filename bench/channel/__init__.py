"""bench/channel: the client library's cost per call.

    python -m bench.channel [--calls N] [--rounds R]

One backend (bench.proxy.backend, its own process), one `lbserver serve` and
one `lbserver register` (their own processes); this process makes N
sequential unary calls (64 bytes) through each client, several rounds
interleaved, and reports the median wall time and this process's CPU time
per call:

- `grpc sync, direct`: grpc.insecure_channel to the backend (the floor);
- `balanced_channel`: agent_shim's sync channel through the balancer;
- `grpc.aio, direct`: grpc.aio.insecure_channel to the backend;
- `aio_balanced_channel`: agent_shim's asyncio channel.

The balancer and backend run in other processes, so the CPU figures are the
client's alone. Compare rows within one run (the machine is shared).
"""
