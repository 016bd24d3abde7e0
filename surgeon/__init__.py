"""Pruning: calibration, curvature, LLM Surgeon, the layer-wise baselines, SDS, and one entry point.

:func:`surgeon.api.prune` dispatches on its config (:mod:`surgeon.api`). Importing ``surgeon``
also registers the per-layer-shape model types (``surgeon_*``) with transformers' Auto classes,
through :mod:`base`, so ``import surgeon`` then ``AutoModelForCausalLM.from_pretrained(dir)``
loads our smaller checkpoints without running code from the directory.
"""

import base  # noqa: F401  (registers the surgeon_* model types)

__version__ = "0.1.0"
