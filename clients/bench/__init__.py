"""Benchmarks and load: `serve` (`steer bench`: this server against plain vLLM in one run),
`kernels` (the cores on CPU / GPU), `loadtest` (a mixed load, no cross-talk), and
`local_server` (a server process to measure)."""
