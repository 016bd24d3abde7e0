"""surgeon-export: the top layer, the Python API and the CLI over it.

``import surgeon_export as se`` gives the API of :mod:`surgeon_export.api` (``se.load``,
``se.prune``, ``se.save``, ``se.export_onnx``, ``se.bench``, ...), imported on first use so that
the CLI starts without loading every stage.
"""

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    api = importlib.import_module("surgeon_export.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'surgeon_export' has no attribute {name!r}")
