"""Time of a cached default-model load's integrity checks: the GGUF file's SHA-256 (the cache key) and the
SHA-256 of every cached tensor (base/integrity.py), i.e. ``resolve_model_dir(None)`` once the cache exists.

    python3 -m benchmarks.cache_checksum   # writes benchmarks/results/cache_checksum_verify.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from base import loading
from base.data import leading_bos
from base.env import environment

OUT = Path(__file__).resolve().parent / "results" / "cache_checksum_verify.json"


def main(repeat: int = 3) -> dict:
    torch.set_num_threads(1)
    directory, _ = loading.resolve_model_dir(None)  # builds the cache on first use
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loading.resolve_model_dir(None)
        times.append(time.perf_counter() - t0)
    tokenizer = loading.load_tokenizer(directory)
    result = {
        "what": "resolve_model_dir(default) with the cache built: GGUF file SHA-256 + every cached tensor's SHA-256",
        "seconds": sorted(times), "median_seconds": sorted(times)[len(times) // 2],
        "cached_bytes": sum(f.stat().st_size for f in loading.weight_files(directory)),
        "gguf_bytes": loading.default_gguf().stat().st_size,
        "default_tokenizer_leading_bos": leading_bos(tokenizer), "threads": torch.get_num_threads(),
        "environment": environment(), "note": "shared 2-core machine, other jobs running",
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
