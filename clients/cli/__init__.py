"""The `steer` command: `serve` runs the server; `chat`, `complete`, `vectors` and `probe` talk
to a running one through the SDK; `bench` compares it with plain vLLM."""
