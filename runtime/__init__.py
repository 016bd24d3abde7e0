"""Runtime backends and the one decode loop, used by ``generate`` and by ``bench``.

- ``backend.py``: the :class:`~runtime.backend.Backend` protocol every runtime implements and the
  one registry (:func:`~runtime.backend.load_backend`); a new runtime is one module plus one
  registration there;
- ``generate.py``: the decode loop (greedy or sampling, stop tokens, batches, timed prefill and decode);
- ``torch_backend.py``: eager Hugging Face models; ``ort.py``: ONNX exports on ONNX Runtime, with
  the KV cache bound in place between steps, and what every ONNX-export runtime shares
  (``GraphBackend``); ``openvino.py``: the same exports compiled by OpenVINO for the CPU; ``llama_cpp.py``: GGUF
  files on llama.cpp (llama-cpp-python, its own KV cache, one sequence per batch row); ``load.py`` and its helpers (``semi_structured.py``,
  ``sparse_linear.py``): packed (2:4, N:M, CSR/BSR) checkpoints on torch.
"""
