"""Mirostat v2 (Basu et al. 2021, arXiv 2007.14966): a per-request target surprise τ with its
running bound μ kept per row across engine steps (`steering.mirostat`, llama.cpp's
`mirostat: 2`). Core: `core` (truncation and the μ update); in the engine: `adapter` (one
logits processor whose state follows the row through moves, swaps and preemption)."""
