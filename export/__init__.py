"""Writers for deployable formats (smaller dense checkpoints, ONNX, 2:4 and CSR/BSR safetensors).

- ``checkpoint.py``: atomic checkpoint writing and the pruning report;
- ``compress.py``: zeroed coupled groups of a masked model -> a removal plan for ``base.surgery``;
- ``shapes.py``: aligned (``--align N``) and uniform (``--uniform``) sizes, chosen by cost;
- ``pruned.py``: physically smaller checkpoints, per-layer (``surgeon_*``) or stock;
- ``flops.py``: matmul FLOPs per token of a (shrunk) config.
- ``onnx.py``, ``onnx_graph.py``, ``onnx_simplify.py``: ONNX decoder graph with KV cache (optimum's
  names, per-layer KV heads), shape folding, verification against torch.
- ``gguf.py``: one GGUF file for llama.cpp (Llama and Gemma families; per-layer shapes as llama.cpp's
  ``deci``); ``gguf_tokenizer.py``: the tokenizer as GGUF metadata.
"""
