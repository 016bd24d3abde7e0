"""Streamed pruning measured: peak memory and time per layer, whole-model vs streamed, up to Llama-2-7B shapes.

Two parts, each method in its own process (``prune --json`` reports the process's peak RSS):

- ``default``: the default model (SmolLM2-135M), SparseGPT 2:4 and Wanda 50%, whole-model
  (``--no-streaming``) against streamed (``--streaming``), 64 x 512 calibration tokens, without
  evaluation (peak RSS of the pruning alone); whether the two outputs' tensors are identical
  (identical tensors: identical perplexity).
- ``ladder``: Llama-shaped models with seeded random weights written to disk in bfloat16 (the
  shapes of SmolLM2-360M, SmolLM2-1.7B, Llama-3.2-1B and Llama-2-7B; weights cannot be downloaded
  here, and memory and time depend on the shapes only), pruned streamed with Wanda 50% and SparseGPT
  2:4 on 8 x 512 random calibration tokens: peak RSS and seconds per layer. ``--layers K`` keeps the
  first K layers (full vocabulary) to bound the time; ``--full MODEL`` runs that shape whole.

    python -m benchmarks.streaming default --out benchmarks/results/streaming_default.json
    python -m benchmarks.streaming ladder --work /tmp/ladder --layers 4 --out benchmarks/results/streaming_ladder.json
    python -m benchmarks.streaming ladder --work /tmp/ladder --only llama2-7b --methods wanda \\
        --out benchmarks/results/streaming_7b_wanda.json

The random models are written shard by shard (one decoder layer per file), so writing a 13.5 GB
model needs about one layer of memory too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from base.env import environment

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied embeddings
    "smollm2-360m": (960, 2560, 32, 15, 5, 64, 49152, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 64, 49152, True),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama2-7b": (4096, 11008, 32, 32, 32, 128, 32000, False),
}
METHODS = {"wanda": ["--method", "wanda", "--sparsity", "0.5"], "sparsegpt": ["--method", "sparsegpt", "--pattern", "2:4"]}


def write_random_llama(out: Path, shape: tuple, layers: int | None, seed: int = 0) -> Path:
    """A Llama checkpoint of ``shape`` with seeded N(0, 0.02) bfloat16 weights, one shard per layer."""
    from transformers import LlamaConfig

    from base.loading import load_tokenizer, resolve_model_dir

    hidden, inter, n_layers, heads, kv, head_dim, vocab, tied = shape
    n_layers = min(n_layers, layers or n_layers)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    shards = n_layers + 1
    weight_map = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn.q_proj.weight": randn(heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": randn(kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": randn(kv * head_dim, hidden),
                   p + "self_attn.o_proj.weight": randn(hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": randn(inter, hidden),
                   p + "mlp.up_proj.weight": randn(inter, hidden),
                   p + "mlp.down_proj.weight": randn(hidden, inter),
                   p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(tmp / name))
        weight_map.update(dict.fromkeys(tensors, name))
    rest = {"model.embed_tokens.weight": randn(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    if not tied:
        rest["lm_head.weight"] = randn(vocab, hidden)
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(tmp / name))
    weight_map.update(dict.fromkeys(rest, name))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096,
                tie_word_embeddings=tied, rms_norm_eps=1e-5, dtype="bfloat16").save_pretrained(tmp)
    # The default model's tokenizer: the calibration sentence's ids are far below every vocabulary size.
    load_tokenizer(resolve_model_dir(None)[0]).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def run_prune(model: str | None, out: Path, args: list[str], threads: int) -> dict:
    """``surgeon-export prune`` in its own process; its JSON plus wall time."""
    cmd = [sys.executable, "-m", "surgeon_export.cli", "prune", *([model] if model else []), *args, "--out", str(out),
           "--force", "--json", "--quiet", "--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "wall_seconds": wall}
    result = json.loads(proc.stdout)
    result.pop("environment", None)
    return {**result, "wall_seconds": wall}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def read(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    x, y = read(a), read(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def default_part(work: Path, threads: int) -> list[dict]:
    rows = []
    for method, args in METHODS.items():
        outs = {}
        for mode in ("--no-streaming", "--streaming"):
            outs[mode] = work / f"default-{method}{mode}"
            r = run_prune(None, outs[mode], [*args, mode, "--no-eval"], threads)  # peak RSS of the prune alone
            rows.append({"model": "default (SmolLM2-135M)", "method": method, "mode": mode.strip("-"),
                         "peak_rss_mib": r.get("peak_rss_mib"), "wall_seconds": round(r["wall_seconds"], 1),
                         "prune_seconds": r.get("seconds"), "sparsity": r.get("sparsity"), "error": r.get("error")})
            print(json.dumps(rows[-1]), flush=True)
        rows[-1]["identical_tensors_to_whole"] = same_tensors(outs["--no-streaming"], outs["--streaming"])
    return rows


def ladder_part(work: Path, names: list[str], methods: list[str], layers: int | None, threads: int) -> list[dict]:
    rows = []
    for name in names:
        model = write_random_llama(work / f"{name}{'-' + str(layers) + 'l' if layers else ''}", SHAPES[name], layers)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for method in methods:
            out = work / f"{model.name}-{method}"
            r = run_prune(str(model), out, [*METHODS[method], "--streaming", "--calib-samples", "8", "--no-eval",
                                            "--calib-text", str(work / "random.txt")], threads)
            rows.append({"model": name, "layers": json.loads((model / "config.json").read_text())["num_hidden_layers"],
                         "weights_on_disk_bytes": disk, "method": method, "peak_rss_mib": r.get("peak_rss_mib"),
                         "wall_seconds": round(r["wall_seconds"], 1), "prune_seconds": r.get("seconds"),
                         "seconds_per_layer": r.get("layer_seconds"), "sparsity": r.get("sparsity"),
                         "memory_plan": r.get("memory_plan"), "error": r.get("error")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "seconds_per_layer"}), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("default", "ladder"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-streaming"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="ladder: keep the first K layers of each shape")
    parser.add_argument("--only", default=",".join(SHAPES), help="ladder: comma-separated shapes")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # Random calibration text of ids the tiny tokenizer knows: the weights are random, the text is arbitrary.
    (args.work / "random.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 6000))
    torch.set_num_threads(args.threads)
    if args.part == "default":
        rows = default_part(args.work, args.threads)
    else:
        rows = ladder_part(args.work, args.only.split(","), args.methods.split(","), args.layers, args.threads)
    doc = {"kind": "surgeon-export streaming benchmark", "part": args.part, "environment": environment(),
           "note": "ladder models: Llama shapes with seeded random bfloat16 weights (not the real models)",
           "calibration": "default: 64 x 512 WikiText-2 valid; ladder: 8 x 512 tokens of a repeated sentence",
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
