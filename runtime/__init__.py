"""Loaders and one generate interface over the exported artefacts (torch dense, torch 2:4 and CSR, ONNX Runtime).

- ``generate.py``: the ``Decoder`` protocol every backend implements, the generate loop (greedy or
  sampling, stop tokens, batches) and the registry of backends by name;
- ``torch_backend.py``: eager Hugging Face models; ``ort.py``: ONNX exports on ONNX Runtime, with
  the KV cache bound in place between steps;
- ``load.py`` and its helpers: compressed (2:4, CSR/BSR) checkpoints.
"""
