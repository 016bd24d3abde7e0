"""Loaders and one generate interface over the exported artefacts (torch dense, torch 2:4, ONNX Runtime).

Empty until the runtime issues land; the package exists so the layout installs as one distribution.
"""
