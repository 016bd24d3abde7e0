"""surgeon-export: prune language models, export them to deployable formats, run and measure them.

The pipeline, left to right (a stage imports only from stages to its left; ``surgeon.cli`` imports
them all): ``surgeon`` (loading, calibration, pruning) -> ``export`` -> ``runtime`` -> ``benchmarks``.
"""

__version__ = "0.1.0"

# Make AutoConfig/AutoModelForCausalLM load our per-layer-shape checkpoints (model types
# ``surgeon_*``) without running code from the checkpoint directory.
from surgeon.modeling import register as _register  # noqa: E402

_register()
