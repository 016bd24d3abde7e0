"""Measurement: the benchmark runner (``run.py``: coordinator, ``worker.py``: one model per process,
``latency.py``: timing and memory primitives, ``report.py``: markdown and plots, ``gate.py``: the CI
gate), the pruning sweep (``prune_sweep.py``, ``prune_report.py``) and recorded scripts
(``sparse_formats.py``, ``kfac_memory.py``, ``gpu_check.py``); results under ``results/``.

Every backend comes from :mod:`runtime.backend`; perplexity from :mod:`base.perplexity`.
"""
