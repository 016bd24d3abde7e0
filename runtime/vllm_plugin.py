"""The vLLM plugin of surgeon-export: vLLM serves our per-layer-shape checkpoints.

vLLM calls :func:`register` in every one of its processes (the ``vllm.general_plugins`` entry point
``surgeon`` in ``pyproject.toml``; vLLM's docs, "Plugin system"), so ``vllm serve DIR`` and
``vllm.LLM(DIR)`` load a ``surgeon_*`` checkpoint once surgeon-export is installed beside vLLM,
with nothing copied into the model directory and no ``trust_remote_code``. It does two things:

- makes transformers' ``AutoConfig`` know every ``surgeon_*`` model type (:func:`base.modeling.register`),
  so vLLM reads the per-layer sizes from ``config.json`` without running the directory's code;
- registers the model classes of :mod:`runtime.vllm_models` with vLLM's ``ModelRegistry`` under the
  ``architectures`` names our checkpoints carry, as ``module:class`` strings, so vLLM imports them
  only when such a checkpoint is loaded.
"""

from __future__ import annotations

SERVED = ("SurgeonLlamaForCausalLM", "SurgeonMistralForCausalLM",  # built from vLLM's own layers
          "SurgeonQwen2ForCausalLM", "SurgeonQwen3ForCausalLM",
          "SurgeonGemmaForCausalLM", "SurgeonGemma2ForCausalLM", "SurgeonGemma3ForCausalLM",
          "SurgeonOPTForCausalLM")


def register() -> None:
    """Register the ``surgeon_*`` configs with transformers and our architectures with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from base.modeling import register as register_configs

    register_configs()
    known = set(ModelRegistry.get_supported_archs())
    for arch in SERVED:
        if arch not in known:
            ModelRegistry.register_model(arch, f"runtime.vllm_models:{arch}")
