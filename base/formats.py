"""Names shared by the writers and the readers of our files, defined once.

Writers live in :mod:`export`, readers in :mod:`runtime` and :mod:`benchmarks`; both import the
names from here.
"""

from __future__ import annotations

import torch

REPORT_FILE = "surgeon_report.json"  # beside pruned weights: what was pruned, how, measured in the saved files
MODELING_FILE = "modeling_surgeon.py"  # a copy of base/modeling.py beside per-layer-shape checkpoints
NAS_CONFIG_FILE = "configuration_nemotron_nas.py"  # a copy of base/nemotron_nas.py beside Nemotron-NAS checkpoints
ONNX_FILE = "model.onnx"  # the decoder graph of an ONNX export directory
ONNX_DATA_FILE = "model.onnx_data"  # its external weights, when written
ONNX_MANIFEST_FILE = "surgeon_onnx.json"  # beside the graph: export settings, decoder-linear initializers
PACK_WEIGHTS_FILE = "model.sparse.safetensors"  # compressed (N:M, CSR, BSR) tensors
PACK_MANIFEST_FILE = "surgeon_sparse.json"  # beside them: layout, dtype, checksums
GGUF_TRUE_FFN_KEY = "surgeon.feed_forward_length"  # GGUF: the MLP widths before zero padding (export/gguf.py)
GGUF_TENSOR_SHA_KEY = "surgeon.tensor_sha256"  # GGUF: per tensor (file order), sha256 of its name, shape, type, bytes
GGUF_METADATA_SHA_KEY = "surgeon.metadata_sha256"  # GGUF: sha256 of every other metadata field as stored

# Floating dtypes by the names our options, configs and manifests use.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")
