"""Streamed pruning measured: peak memory and time per layer, whole-model vs streamed, up to Llama-2-7B shapes.

Two parts, each method in its own process (``prune --json`` reports the process's peak RSS):

- ``default``: the default model (SmolLM2-135M), whole-model (``--no-streaming``) against streamed
  (``--streaming``), each method's default calibration, without evaluation (peak RSS of the pruning
  alone); whether the two outputs' tensors are identical (identical tensors: identical perplexity;
  a streamed structured run's zeroed groups are cut out with ``surgeon-export shrink`` first, as
  whole-model mode saves it cut); ``--eval`` measures both perplexities too.
- ``ladder``: Llama-shaped models with seeded random weights written to disk in bfloat16 (the
  shapes of SmolLM2-360M, SmolLM2-1.7B, Llama-3.2-1B and Llama-2-7B; weights cannot be downloaded
  here, and memory and time depend on the shapes only), pruned streamed on 8 x 512 random
  calibration tokens: peak RSS and seconds per layer (LLM Surgeon: the peak of each layer's steps
  too). ``--layers K`` keeps the first K layers (full vocabulary) to bound the time, and the full
  depth's time is extrapolated from the measured layers.

Methods (``--methods``): ``wanda`` (50%), ``sparsegpt`` (2:4), ``surgeon-2:4``, ``surgeon-structured``
(80% kept); ``--prune-args`` adds options to every run (``'--shots 1 --calib-samples 4'``).

    python -m benchmarks.streaming default --out benchmarks/results/streaming_default.json
    python -m benchmarks.streaming default --methods surgeon-2:4,surgeon-structured \
        --out benchmarks/results/streaming_surgeon_default.json
    python -m benchmarks.streaming ladder --work /tmp/ladder --layers 4 --out benchmarks/results/streaming_ladder.json
    python -m benchmarks.streaming ladder --work /tmp/ladder --only llama2-7b --layers 2 --methods surgeon-2:4 \
        --out benchmarks/results/streaming_7b_surgeon.json

The random models are written shard by shard (one decoder layer per file), so writing a 13.5 GB
model needs about one layer of memory too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
METHODS = {"wanda": ["--method", "wanda", "--sparsity", "0.5"], "sparsegpt": ["--method", "sparsegpt", "--pattern", "2:4"],
           "surgeon-2:4": ["--method", "surgeon", "--pattern", "2:4"],
           "surgeon-structured": ["--method", "surgeon", "--structured", "0.8"]}


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


def shrink(directory: Path, out: Path) -> None:
    """``surgeon-export shrink``: a streamed structured run's zeroed groups cut out, as whole-model mode saves it."""
    cmd = [sys.executable, "-m", "surgeon_export.cli", "shrink", str(directory), "--out", str(out), "--force", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def perplexity(directory: Path, threads: int) -> float | None:
    cmd = [sys.executable, "-m", "surgeon_export.cli", "eval", str(directory), "--json", "--quiet", "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return json.loads(proc.stdout)["perplexity"] if proc.returncode == 0 else None


def default_part(work: Path, methods: list[str], extra: list[str], threads: int, evaluate: bool,
                 modes: tuple[str, ...] = ("--no-streaming", "--streaming")) -> list[dict]:
    rows = []
    for method in methods:
        outs, results = {}, {}
        for mode in modes:
            outs[mode] = work / f"default-{method}{mode}"
            # --no-eval: peak RSS of the prune alone
            results[mode] = r = run_prune(None, outs[mode], [*METHODS[method], *extra, mode, "--no-eval"], threads)
            rows.append({"model": "default (SmolLM2-135M)", "method": method, "mode": mode.strip("-"),
                         "settings": " ".join([*METHODS[method], *extra]),
                         "peak_rss_mib": r.get("peak_rss_mib"), "wall_seconds": round(r["wall_seconds"], 1),
                         "prune_seconds": r.get("seconds"), "sparsity": r.get("sparsity"),
                         "layer_peak_rss_mib": r.get("layer_peak_rss_mib"), "error": r.get("error")})
            print(json.dumps(rows[-1]), flush=True)
        if len(modes) < 2:  # one mode measured alone (its memory and time): nothing to compare
            if evaluate and "error" not in r:
                rows[-1]["perplexity"] = perplexity(outs[mode], threads)
            continue
        whole, streamed = results["--no-streaming"], results["--streaming"]
        compare = outs["--streaming"]
        if "--structured" in METHODS[method] and "error" not in streamed:  # whole-model mode saves it cut
            compare = work / f"default-{method}-streamed-shrunk"
            shrink(outs["--streaming"], compare)
        rows[-1]["identical_tensors_to_whole"] = same_tensors(outs["--no-streaming"], compare)
        rows[-1]["same_shot_sparsities"] = ([s["sparsity"] for s in whole.get("shots", [])]
                                            == [s["sparsity"] for s in streamed.get("shots", [])])
        if evaluate:
            ppl = {mode: perplexity(compare if mode == "--streaming" else outs[mode], threads) for mode in outs}
            rows[-1]["perplexity"] = {"whole": ppl["--no-streaming"], "streamed": ppl["--streaming"]}
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layer_peak_rss_mib"}), flush=True)
    return rows


def ladder_part(work: Path, names: list[str], methods: list[str], layers: int | None, threads: int,
                extra: list[str]) -> list[dict]:
    rows = []
    for name in names:
        model = write_random_llama(work / f"{name}{'-' + str(layers) + 'l' if layers else ''}", SHAPES[name], layers)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        for method in methods:
            out = work / f"{model.name}-{method}"
            r = run_prune(str(model), out, [*METHODS[method], "--streaming", "--calib-samples", "8", "--no-eval",
                                            "--calib-text", str(work / "random.txt"), *extra], threads)
            per_layer = r.get("layer_seconds") or []
            rows.append({"model": name, "layers": n_layers, "settings": " ".join([*METHODS[method], *extra]),
                         "weights_on_disk_bytes": disk, "method": method, "peak_rss_mib": r.get("peak_rss_mib"),
                         "wall_seconds": round(r["wall_seconds"], 1), "prune_seconds": r.get("seconds"),
                         "seconds_per_layer": per_layer, "layer_peak_rss_mib": r.get("layer_peak_rss_mib"),
                         "sparsity": r.get("sparsity"), "memory_plan": r.get("memory_plan"), "error": r.get("error")})
            if per_layer and layers and SHAPES[name][2] > n_layers:
                # one layer in memory at a time: the full depth costs each layer's time again, at the same peak
                # (what lies outside the layers and the calibration windows do not grow with depth)
                full = SHAPES[name][2]
                rest = (r.get("seconds") or 0.0) - sum(per_layer)
                rows[-1]["extrapolated_full_model"] = {
                    "layers": full, "seconds": round(rest + full * sum(per_layer) / len(per_layer), 1),
                    "peak_rss_mib": r.get("peak_rss_mib"),
                    "note": "seconds: time outside the layer steps + layers x the mean measured seconds per layer"}
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
    parser.add_argument("--methods", default="wanda,sparsegpt", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--prune-args", default="", help="more prune options for every run, e.g. '--shots 1'")
    parser.add_argument("--eval", action="store_true", help="default: protocol perplexity of both outputs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="no-streaming,streaming",
                        help="default: which modes to run (streaming alone: no whole-model run to compare with)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # Random calibration text of ids the tiny tokenizer knows: the weights are random, the text is arbitrary.
    (args.work / "random.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 6000))
    torch.set_num_threads(args.threads)
    extra = shlex.split(args.prune_args)
    if args.part == "default":
        modes = tuple(f"--{m}" for m in args.modes.split(","))
        rows = default_part(args.work, args.methods.split(","), extra, args.threads, args.eval, modes)
    else:
        rows = ladder_part(args.work, args.only.split(","), args.methods.split(","), args.layers, args.threads, extra)
    doc = {"kind": "surgeon-export streaming benchmark", "part": args.part, "environment": environment(),
           "note": "ladder models: Llama shapes with seeded random bfloat16 weights (not the real models)",
           "calibration": "default: the method's default windows (64 x 512; LLM Surgeon structured 16 x 512) of "
                          "WikiText-2 valid unless --prune-args says otherwise; ladder: 8 x 512 tokens of a repeated sentence",
           "prune_args": args.prune_args,
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
