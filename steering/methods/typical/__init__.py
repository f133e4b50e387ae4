"""Locally typical sampling (Meister et al. 2022, arXiv 2202.00666): `typical_p` or
`steering.typical`. Core: `core` (HF's `TypicalLogitsWarper`, batched); in the engine: one
logits processor (`adapter`); a gate can switch its mass on (`typical_p` in a gate's `then`)."""
