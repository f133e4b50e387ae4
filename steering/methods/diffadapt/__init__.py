"""DiffAdapt (arXiv 2510.19669): a probe on the question's final hidden state picks an easy /
normal / hard strategy (framing, temperature, top-p, token budget), or `difficulty` sets it
(`steering.diffadapt`). Core: `core` (labels, the probe and its training, the two recipes);
per request: `selector` (the probe pass and the decision); here: the pass before generation
that frames the request and sets each prompt's sampling."""
