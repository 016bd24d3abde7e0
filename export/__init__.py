"""Writers for deployable formats (smaller dense checkpoints, ONNX, 2:4 and CSR/BSR safetensors).

Empty until the export issues land; the package exists so the layout installs as one distribution.
"""
