"""V-Reason (arXiv 2510.17045): every k generated tokens, a few Adam steps on the last
decoder layer's value cache that raise the entropy while its EMA is at its peak and lower it
below (`steering.vreason`). Core: `core` (the objective, the recomputed last layer, the update;
tested against HF transformers); in the engine: `adapter` (the rows' entropy phase and the
value-cache tuner)."""
