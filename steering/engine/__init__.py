"""The engine: vLLM started with every method's adapter, and the one path every engine request
of this server takes. `engine` (lifecycle, health, resources, the choice stream), `client` (the
engine client vLLM's serving layer talks to), `session` (one request's steering), `worker`,
`plugin` and `cpu_fixes` (inside vLLM's processes), `args` (engine arguments). It names no
method: it loops over `steering.methods.registry`.

Nothing is imported here: vLLM loads `plugin` in every process, which must stay light.
"""
