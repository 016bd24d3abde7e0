"""surgeon-export: prune language models, export them to deployable formats, run and measure them.

The pipeline, left to right (a stage imports only from stages to its left; ``surgeon.cli`` imports
them all): ``surgeon`` (loading, calibration, pruning) -> ``export`` -> ``runtime`` -> ``benchmarks``.
"""

__version__ = "0.1.0"
