"""The base layer every stage stands on: what a model is and where its parts are, not what to do with it.

- ``errors.py``: :class:`~base.errors.SurgeonError`, the one user-facing error;
- ``loading.py``: the one model loader (Hugging Face directory, GGUF file, the default model);
- ``adapters.py``: all family knowledge (where each linear lives, coupled groups, per-layer classes,
  ONNX past-key naming, llama.cpp architectures, norm and RoPE quirks); ``modeling.py``: the
  per-layer-shape model classes (torch + transformers only, shipped with checkpoints), so it owns the
  ``surgeon_`` prefix, ``LayerShape`` and the reader of per-layer sizes from a config; ``surgery.py``: removal plans and the shape-changing primitives;
- ``data.py``: corpora and token windows; ``perplexity.py``: the protocol's perplexity;
- ``patterns.py``: N:M sparsity patterns and sparsity checks;
- ``files.py``: names of the files we write and atomic writing; ``env.py``: device and versions.

Nothing here imports from ``surgeon``, ``export``, ``runtime``, ``benchmarks`` or the CLI
(``.importlinter`` enforces it).
"""

# Make AutoConfig/AutoModelForCausalLM load our per-layer-shape checkpoints (model types
# ``surgeon_*``) without running code from the checkpoint directory.
from base.modeling import register as _register

_register()
