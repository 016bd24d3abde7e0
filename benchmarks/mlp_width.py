"""How an MLP's width changes its speed on this CPU: the default model's MLP (hidden 576, SiLU-gated) on one
batch of tokens, for the widths a structured run leaves (1126: 80% of decoder-linear weights kept, uniform) and
their neighbours that are multiples of 8, 32 and 128; interleaved rounds, the median of each::

    python3 benchmarks/mlp_width.py --out benchmarks/results/mlp_width.json

Why the main job saves with ``--align 8`` (zero channels brought back, the same function).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from base.env import environment
from base.files import write_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--widths", default="1126,1128,1120,1136,1152,1536")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, 576, generator=gen)
    widths = [int(w) for w in args.widths.split(",")]
    mlps = {w: [torch.randn(w, 576, generator=gen) * 0.02, torch.randn(w, 576, generator=gen) * 0.02,
                torch.randn(576, w, generator=gen) * 0.02] for w in widths}
    times: dict[int, list[float]] = {w: [] for w in mlps}
    F = torch.nn.functional
    with torch.inference_mode():
        for _ in range(args.rounds):
            for w, (gate, up, down) in mlps.items():
                def mlp() -> torch.Tensor:
                    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
                mlp()
                start = time.perf_counter()
                for _ in range(10):
                    mlp()
                times[w].append((time.perf_counter() - start) / 10 * 1000)
    rows = [{"width": w, "median_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2),
             "max_ms": round(max(t), 2), "ms_per_1536_channels": round(statistics.median(t) / w * 1536, 2)}
            for w, t in times.items()]
    record = {"what": __doc__.splitlines()[0], "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
              "environment": environment(), "rows": rows}
    write_file(args.out, json.dumps(record, indent=2))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
