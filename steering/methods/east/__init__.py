"""EAST, entropic activation steering (Rahn, D'Oro, Bellemare 2024, arXiv 2406.00244):
`steering.east` adds stored vectors to the residual stream. Core: `core` (coefficients, the
paper's Eq. 1 vector); in the engine: `adapter` (rows and per-step coefficients)."""
