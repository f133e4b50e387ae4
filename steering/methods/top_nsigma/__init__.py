"""Top-nσ sampling (Tang et al. 2024, arXiv 2411.07641): keep the tokens whose logit is at least
the row's largest minus n standard deviations (`steering.top_nsigma`, llama.cpp's
`top_n_sigma`). Core: `core` (the paper's rule, batched); in the engine: `adapter` (one logits
processor); a gate can switch it on (`top_nsigma` in a gate's `then`)."""
