"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

It wraps model loading so that, for engines started by entropy-steer (recognised by
`additional_config["entropy_steer"]["layer_steering"]`), the decoder layers become steerable
before vLLM compiles the model, and, on CPUs, the seeded-sampling fix in `cpu_fixes` is
installed in that worker. Any other vLLM engine in the same environment is untouched, and
loads nothing of this project but this module.
"""

from __future__ import annotations

import functools


def steering_options(vllm_config) -> dict | None:
    options = (vllm_config.additional_config or {}).get("entropy_steer") or {}
    return options.get("layer_steering")


def register() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "_entropy_steer", False):  # plugins may load several times
        return

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config, model_config, prefix)
        options = steering_options(vllm_config)
        if options:
            from vllm.platforms import current_platform

            from steering.engine import cpu_fixes
            from steering.runtime.layers import install_steerable_layers

            if current_platform.is_cpu():
                cpu_fixes.install()
            install_steerable_layers(model, vllm_config, slots=int(options["slots"]),
                                     capture_rows=int(options["capture_rows"]))
        return model

    load_model._entropy_steer = True
    BaseModelLoader.load_model = load_model
