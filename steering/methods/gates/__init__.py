"""Closed-loop entropy gates (`steering.gates`) and llama.cpp's dynamic temperature
(`steering.dynatemp`): sampling actions and EAST vectors switched on by each token's live
entropy, varentropy or entropy EMA, inside the batch. One folder for both: one engine stage,
the gate processor (`adapter`), samples their rows. Core: `core` (the gate table and the
sampling chain, batched over rows)."""
