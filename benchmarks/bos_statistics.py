"""What the first position of a calibration window does to the calibration statistics, and to the pruned
model, with and without a leading BOS (issue #29).

Massive activations at the first position (BOS or not) are a known property of trained LLMs and can
swamp second-moment statistics. This measures, on the default model (SmolLM2-135M: its tokenizer adds
no BOS) and on windows that lead with its BOS token (``[BOS] + 511`` tokens, as the product builds for a
BOS-first tokenizer):

1. the share of each linear input's second moment ``trace(A)`` that position 0 carries (a uniform
   share is 1/T), per input group, min/median/max over layers;
2. Wanda 50% (unstructured) and Wanda-style structured 80% with the statistics from every position
   against with position 0 left out, perplexity on the protocol's test windows of the same form.

Usage: ``python -m benchmarks.bos_statistics --calib 16 --windows 16 --threads 1 --out benchmarks/results/bos_statistics.json``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from base.data import calibration_windows, eval_tokens
from base.loading import load_model
from base.perplexity import perplexity
from surgeon.api import build_config, prune_
from surgeon.calibrate import capture_layer_inputs, run_layer
from surgeon.curvature.activations import leading_positions_left_out


def with_bos(ids: torch.Tensor, bos: int) -> torch.Tensor:
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids[:, :-1]], dim=1)


@torch.no_grad()
def first_position_share(lm, windows: torch.Tensor) -> dict:
    """Per input group: position 0's share of trace(A), over the layers."""
    adapter = lm.adapter
    shares: dict[str, list[float]] = {g[0]: [] for g in adapter.input_groups}
    batches = capture_layer_inputs(lm.model, adapter, windows, 4)
    for layer in adapter.decoder_layers(lm.model):
        seen: dict[str, list[torch.Tensor]] = {g[0]: [] for g in adapter.input_groups}
        handles = [layer.get_submodule(g).register_forward_hook(
            lambda _m, a, _o, g=g: seen[g].append(a[0].double().square().sum(-1))) for g in seen]  # [B, T]
        batches = run_layer(layer, batches)
        for h in handles:
            h.remove()
        for g, norms in seen.items():
            n = torch.cat(norms)
            shares[g].append(float(n[:, 0].sum() / n.sum()))
    T = windows.shape[1]
    return {g: {"min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v), "uniform": 1 / T,
                "layers": [round(x, 5) for x in v]} for g, v in shares.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    calib = calibration_windows(lm.model, lm.tokenizer, n=args.calib, seq_len=512, seed=0).ids
    test = eval_tokens(lm.tokenizer, None, None).ids
    forms = {"no BOS (the default model's form)": (calib, None), f"BOS first (token {bos})": (with_bos(calib, bos), bos)}
    result = {"model": lm.source, "calib_windows": args.calib, "eval_windows": args.windows, "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "forms": {}}
    for name, (c, t) in forms.items():
        row: dict = {"first_position_share": first_position_share(lm, c)}
        row["dense_ppl"] = perplexity(lm.model, test, max_windows=args.windows, bos=t, progress=False).perplexity
        for label, cfg in {"wanda 50%": build_config("wanda", sparsity=0.5),
                           "wanda structured 80%": build_config("wanda", structured=0.8)}.items():
            for left_out in (False, True):
                m = load_model()
                t0 = time.perf_counter()
                with leading_positions_left_out(1 if left_out else 0):  # the product's --bos-statistics exclude
                    prune_(m.model, m.adapter, c, cfg, progress=False)
                ppl = perplexity(m.model, test, max_windows=args.windows, bos=t, progress=False).perplexity
                key = f"{label}, position 0 {'left out' if left_out else 'included'}"
                row[key] = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
                print(name, key, ppl, flush=True)
        result["forms"][name] = row
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
