"""DeepConf (Fu et al. 2025, "Deep Think with Confidence", arXiv 2508.15260): parallel traces
filtered by the model's own token confidence before a confidence-weighted vote, offline, or
online with each trace cut in the engine once its sliding-window confidence falls below a
threshold calibrated on warm-up traces (`steering.deepconf`). Core: `core` (the paper's
quantities); in the engine: `adapter` (one logits processor for every row that asks); per
request: `run` (warm-up, threshold, traces, consensus, vote)."""
