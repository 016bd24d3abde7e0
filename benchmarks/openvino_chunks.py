"""Chunked prefill on OpenVINO or not: the same prompt prefilled in one pass and in chunks, timed.

ONNX Runtime prefills long prompts through the cache in chunks of about 512 tokens per pass
(runtime/ort.py: its CPU softmax is slow on masked entries). This measures whether OpenVINO gains
from the same, to choose :data:`runtime.openvino.PREFILL_TOKENS`:

    python3 -m benchmarks.openvino_chunks EXPORT_DIR --threads 2 --out benchmarks/results/openvino_chunks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from base.env import environment
from base.files import write_file
from benchmarks.latency import time_prefill
from runtime.openvino import OpenVinoBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", default="1x128,8x512")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    rows = []
    for prefill_tokens in (0, 512):  # one pass; chunks of max(64, 512 // batch) tokens per row
        backend = OpenVinoBackend(args.export, threads=args.threads, prefill_tokens=prefill_tokens)
        for batch, length in cells:
            prompt = torch.randint(0, backend.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
            time_prefill(backend, prompt)  # warm-up
            seconds = [time_prefill(backend, prompt) for _ in range(args.repeat)]
            rows.append({"prefill_tokens_per_pass": prefill_tokens, "batch": batch, "length": length,
                         "median_s": statistics.median(seconds), "seconds": seconds})
            print(json.dumps(rows[-1]))
        del backend
    payload = {"export": args.export, "threads": args.threads, "environment": environment(torch.device("cpu")),
               "openvino": __import__("openvino").get_version(), "rows": rows}
    write_file(args.out, json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
