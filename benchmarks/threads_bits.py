"""Does ``inverse_spd`` (MKL Cholesky, then its inverse, float64) give the same bits on 1 and 2 threads?

Decides whether a rank waiting in a streamed LLM Surgeon step could lend its core to the rank that inverts
down's ``A`` without giving up bit-identity with a one-process run (docs/streaming.md)::

    python benchmarks/threads_bits.py 512 2048
    MKL_CBWR=AVX2,STRICT python benchmarks/threads_bits.py 512 2048   # both in benchmarks/results/threads_bits.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from base.env import environment
from surgeon.curvature.kfac import inverse_spd


def main(sizes: list[int]) -> None:
    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(n, n + 512, generator=gen, dtype=torch.float64)
        A = X @ X.T / X.shape[1]  # a seeded SPD matrix, as a K-FAC factor
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            out[threads] = (inverse_spd(A.clone(), 0.01)[0], time.perf_counter() - t0)
        rows.append({"n": n, "bit_identical": torch.equal(out[1][0], out[2][0]),
                     "max_abs_difference": float((out[1][0] - out[2][0]).abs().max()),
                     "seconds_1_2_threads": [round(out[1][1], 2), round(out[2][1], 2)]})
    print(json.dumps({"kind": "inverse_spd bits on 1 and 2 threads", "environment": environment(),
                      "MKL_CBWR": os.environ.get("MKL_CBWR"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [512, 2048])
