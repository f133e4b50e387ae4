"""Research experiments against a running server, each writing its results table, plot and
exact command (docs/*/results.md): verifiable problems (`problems`), intervals (`stats`), the
EAST bandit, and one evaluation per method."""
