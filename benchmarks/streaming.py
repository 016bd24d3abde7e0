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
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from base.adapters import get_adapter
from base.env import environment
from base.files import write_dir, write_file
from base.loading import tied_keys

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied embeddings
    "smollm2-360m": (960, 2560, 32, 15, 5, 64, 49152, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 64, 49152, True),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama2-7b": (4096, 11008, 32, 32, 32, 128, 32000, False),
}
METHODS = {"wanda": ["--method", "wanda", "--sparsity", "0.5"], "sparsegpt": ["--method", "sparsegpt", "--pattern", "2:4"],
           "surgeon-2:4": ["--method", "surgeon", "--pattern", "2:4"],
           "surgeon-structured": ["--method", "surgeon", "--structured", "0.8"]}


def gemma3_270m_config() -> Any:
    """Gemma3-270m's text config (issue #29's model): 18 layers, hidden 640, 4 query heads and 1 KV head of
    256, MLP 2048, a 262,144 vocabulary, tied embeddings, 5 sliding (window 512) : 1 full attention layers."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, query_pre_attn_scalar=256,
                            max_position_embeddings=32768, tie_word_embeddings=True, dtype="bfloat16")


def synthetic_tokenizer(vocab: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of exactly ``vocab`` entries with seeded random merges: the memory a
    tokenizer of that vocabulary holds (0.25 GiB at 262,144 entries), not a language's tokens."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens, merges = list(alphabet), []
    seen = set(tokens)
    while len(tokens) < vocab:  # each new token joins an earlier (often a recent) one with a short one
        a = rng.choice(tokens[-5000:] if rng.random() < 0.3 else tokens[:2000])
        b = rng.choice(tokens[:300])
        if a + b not in seen and len(a + b) <= 16:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=alphabet[0], eos_token=alphabet[1])


def write_random(config: Any, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 tokenizer: Any = None) -> Path:
    """A checkpoint of the model ``config`` describes, with seeded N(0, 0.02) weights in ``dtype`` (norms
    at their identity: 1, Gemma's ``1 + w`` 0; biases, LayerNorm's too, 0), one shard per decoder layer, and ``tokenizer``
    (default: the default model's, whose ids lie below every vocabulary here)."""
    from transformers import AutoModelForCausalLM

    from base.loading import load_tokenizer, resolve_model_dir

    if (out / "config.json").is_file():
        return out
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tied = tied_keys(skeleton)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in tied}
    n_layers = config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    identity = 1.0 - get_adapter(config.model_type).norm_offset  # the norm weight w with norm_offset + w = 1

    def tensor(name: str, shape: tuple) -> torch.Tensor:
        if len(shape) > 1:
            return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
        return torch.full(shape, identity if "norm" in name and name.endswith("weight") else 0.0, dtype=dtype)

    def fill(tmp: Path) -> None:
        prefix = f"{get_adapter(config.model_type).layers}."  # one shard per decoder layer
        weight_map = {}
        for i in range(n_layers + 1):  # the decoder layers, then everything else
            inside = (lambda k: k.startswith(f"{prefix}{i}.")) if i < n_layers else (lambda k: not k.startswith(prefix))
            tensors = {k: tensor(k, shape) for k, shape in shapes.items() if inside(k)}
            name = f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors"
            save_file(tensors, str(tmp / name))
            weight_map.update(dict.fromkeys(tensors, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config.save_pretrained(tmp)
        (tokenizer or load_tokenizer(resolve_model_dir(None)[0])).save_pretrained(tmp)

    write_dir(out, fill)
    return out


def write_random_llama(out: Path, shape: tuple, layers: int | None, seed: int = 0) -> Path:
    """A Llama checkpoint of ``shape`` with seeded N(0, 0.02) bfloat16 weights, one shard per layer."""
    from transformers import LlamaConfig

    hidden, inter, n_layers, heads, kv, head_dim, vocab, tied = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=min(n_layers, layers or n_layers), num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096,
                         tie_word_embeddings=tied, rms_norm_eps=1e-5, dtype="bfloat16")
    return write_random(config, out, seed)


def run_prune(model: str | None, out: Path, args: list[str], threads: int, *, sample: bool = False,
              ranks: int = 1) -> dict:
    """``surgeon-export prune`` in its own process (``ranks`` > 1: under ``torchrun --standalone``, each rank with
    ``threads`` threads; the report's ``distributed`` has every rank's peak RSS and collective bytes); its JSON
    plus wall time. ``sample``: the process's resident memory read every 0.1 s (``VmRSS``) and charged to the
    step its progress output last named (``rss_by_phase_mib``: the peak in each; ``after X``: once bar X
    finished, before the next began)."""
    import re
    import threading

    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m",
               "surgeon_export"] if ranks > 1 else [sys.executable, "-m", "surgeon_export.cli"])
    cmd = [*launch, "prune", *([model] if model else []), *args, "--out", str(out),
           "--force", "--json", "--threads", str(threads), *([] if sample else ["--quiet"])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streams = {"stdout": b"", "stderr": b""}
    phase = ["start"]
    bar = re.compile(r"([^|]*?):\s+(\d+)%\|")

    def read(name: str) -> None:
        pipe = getattr(proc, name)
        for chunk in iter(lambda: pipe.read1(4096), b""):
            streams[name] += chunk
            if name == "stderr":  # the last line or progress bar: which step runs now
                text = re.split(r"[\r\n]", chunk.decode(errors="replace").rstrip("\r\n"))[-1]
                match = bar.search(text)
                if match:
                    phase[0] = ("after " if match[2] == "100" else "") + match[1].strip()
                elif text.strip():
                    phase[0] = text.strip()[:60]

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in streams]
    for t in readers:
        t.start()
    peaks: dict[str, float] = {}
    while proc.poll() is None:
        if sample:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]
                peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            except (OSError, TypeError):
                pass
        time.sleep(0.1)
    for t in readers:
        t.join()
    wall = time.perf_counter() - start
    stderr = streams["stderr"].decode(errors="replace").strip()
    sampled = {"rss_by_phase_mib": {k: round(v) for k, v in peaks.items()}} if sample else {}
    if proc.returncode != 0:  # our one line (under torchrun the last line is torchrun's own banner), else the last
        lines = stderr.splitlines()
        ours = [line for line in lines if line.startswith("error: ")]
        return {"error": (ours or lines or [f"exit {proc.returncode}"])[-1], "wall_seconds": wall, **sampled}
    result = json.loads(streams["stdout"])
    result.pop("environment", None)
    return {**result, "wall_seconds": wall, **sampled}


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
                extra: list[str], ranks: int = 1, keep: bool = False) -> list[dict]:
    rows = []
    for name in names:
        model = write_random_llama(work / f"{name}{'-' + str(layers) + 'l' if layers else ''}", SHAPES[name], layers)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        for method in methods:
            out = work / f"{model.name}-{method}"
            r = run_prune(str(model), out, [*METHODS[method], "--streaming", "--calib-samples", "8", "--no-eval",
                                            "--calib-text", str(work / "random.txt"), *extra], threads, ranks=ranks)
            per_layer = r.get("layer_seconds") or []
            # under torchrun the prune's own report is rank 0's: the run's peak is the largest rank's
            peak = max((x["peak_rss_mib"] for x in (r.get("distributed") or {}).get("ranks", [])),
                       default=r.get("peak_rss_mib"))
            rows.append({"model": name, "layers": n_layers, "settings": " ".join([*METHODS[method], *extra]),
                         "ranks": ranks, "threads_per_rank": threads, "distributed": r.get("distributed"),
                         "weights_on_disk_bytes": disk, "method": method, "peak_rss_mib": peak,
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
                    "peak_rss_mib": peak,
                    "note": "seconds: time outside the layer steps + layers x the mean measured seconds per layer"}
            if keep and "error" not in r:  # the checkpoint written, loaded back (meta weights: its config and index)
                rows[-1]["checkpoint"] = loadable(out)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "seconds_per_layer"}), flush=True)
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
    return rows


LOAD_CHECK = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    logits = model(input_ids=torch.arange(1, 9)[None]).logits
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "logits_finite": bool(logits.isfinite().all()),
                  "load_and_forward_seconds": round(time.perf_counter() - t0, 1)}))
"""


def loadable(directory: Path) -> dict:
    """The checkpoint written, loaded by transformers in bfloat16 (its own dtype) and run on 8 tokens."""
    proc = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(directory)], capture_output=True, text=True)
    return {"path": str(directory), "bytes_on_disk": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
            "transformers_load": json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr[-500:]}


MEMORY_PARTS = ("default", "families", "gemma3-270m")


def memory_part(work: Path, parts: list[str], threads: int, shots: int = 2) -> list[dict]:
    """Streamed runs' peak RSS against ``memory_plan``'s estimate (the ``memory_plan.streamed_bytes`` the run
    logged), with the resident memory per step (:func:`run_prune` ``sample``): the default model (Wanda 50%,
    LLM Surgeon structured 80% kept, 4 x 256, one shot), the tiny model of every family (tests/families.py,
    4 x 32) and Gemma3-270m's shapes (issue #29's command: 8 x 512, 2 shots, K-FAC batch 1; Wanda 8 x 512)."""
    text = str(work / "random.txt")
    small = ["--calib-samples", "4"]
    cases: list[tuple[str, str | None, str, list[str]]] = []
    if "default" in parts:
        cases += [("default (SmolLM2-135M)", None, m, [*small, "--seq-len", "256", *(["--shots", "1"] if "surgeon" in m else [])])
                  for m in ("wanda", "surgeon-structured")]
    if "families" in parts:
        from tests.families import FAMILIES, save_family

        for family in FAMILIES:
            directory = work / f"tiny-{family}"
            if not (directory / "config.json").is_file():
                save_family(family, directory)
            cases += [(f"tiny {family}", str(directory), m, [*small, "--seq-len", "32", "--calib-text", text,
                                                              *(["--shots", "1"] if "surgeon" in m else [])])
                      for m in ("wanda", "surgeon-structured")]
    if "gemma3-270m" in parts:
        directory = work / "gemma3-270m"
        if not (directory / "config.json").is_file():
            write_random(gemma3_270m_config(), directory, tokenizer=synthetic_tokenizer(262144))
        cases += [("Gemma3-270m shapes (random bf16)", str(directory), "surgeon-structured",
                   ["--calib-samples", "8", "--shots", str(shots), "--kfac-batch", "1", "--calib-text", text]),
                  ("Gemma3-270m shapes (random bf16)", str(directory), "wanda", ["--calib-samples", "8", "--calib-text", text])]
    rows = []
    for label, model, method, args in cases:
        out = work / f"memory-{(model and Path(model).name) or 'default'}-{method}"
        r = run_prune(model, out, [*METHODS[method], *args, "--streaming", "--no-eval", "--no-check-streaming"],
                      threads, sample=True)
        plan = r.get("memory_plan") or {}
        estimate = plan.get("streamed_bytes", 0) / 2**20
        measured = r.get("peak_rss_mib")
        rows.append({"model": label, "method": method, "settings": " ".join([*METHODS[method], *args]),
                     "estimate_mib": round(estimate), "peak_rss_mib": round(measured) if measured else None,
                     "estimate_over_measured": round(estimate / measured, 3) if measured else None,
                     "within_25_percent": bool(measured and abs(estimate / measured - 1) <= 0.25),
                     "rss_by_phase_mib": r.get("rss_by_phase_mib"), "wall_seconds": round(r["wall_seconds"], 1),
                     "error": r.get("error")})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def memory_markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = ["# memory_plan against measured peak RSS (streamed)\n",
             f"{env['device']}, {env['threads']} thread(s), torch {env['torch']}, transformers {env['transformers']}, "
             f"commit {env['git_commit']}, {env['date']}. `python -m benchmarks.streaming memory`; each run its own "
             "process, `--streaming --no-eval --no-check-streaming`; peak RSS is the process's `ru_maxrss`.\n",
             "| model | method | settings | estimate MiB | peak RSS MiB | estimate / peak | within 25% |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['method']} | `{r['settings']}` | {r['estimate_mib']} | {r['peak_rss_mib']} | "
                     f"{r['estimate_over_measured']} | {'yes' if r['within_25_percent'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("default", "ladder", "memory"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-streaming"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="ladder: keep the first K layers of each shape")
    parser.add_argument("--only", default=None, help="ladder: comma-separated shapes (default: all); memory: of "
                        f"{', '.join(MEMORY_PARTS)} (default: all)")
    parser.add_argument("--methods", default="wanda,sparsegpt", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--prune-args", default="", help="more prune options for every run, e.g. '--shots 1'")
    parser.add_argument("--eval", action="store_true", help="default: protocol perplexity of both outputs")
    parser.add_argument("--threads", type=int, default=2, help="threads (per rank with --ranks)")
    parser.add_argument("--ranks", type=int, default=1, help="ladder: run each prune under torchrun on this many ranks")
    parser.add_argument("--keep", action="store_true", help="ladder: keep the checkpoints written (and check them)")
    parser.add_argument("--shots", type=int, default=2, help="memory: LLM Surgeon's shots on the Gemma3-270m shapes")
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
    elif args.part == "memory":
        rows = memory_part(args.work, (args.only or ",".join(MEMORY_PARTS)).split(","), args.threads, args.shots)
    else:
        rows = ladder_part(args.work, (args.only or ",".join(SHAPES)).split(","), args.methods.split(","), args.layers,
                           args.threads, extra, args.ranks, args.keep)
    doc = {"kind": "surgeon-export streaming benchmark", "part": args.part, "environment": environment(),
           "note": "ladder models: Llama shapes with seeded random bfloat16 weights (not the real models)",
           "calibration": "default: the method's default windows (64 x 512; LLM Surgeon structured 16 x 512) of "
                          "WikiText-2 valid unless --prune-args says otherwise; ladder: 8 x 512 tokens of a repeated sentence",
           "prune_args": args.prune_args,
           "rows": rows}
    write_file(args.out, json.dumps(doc, indent=2))
    if args.part == "memory":
        write_file(args.out.with_suffix(".md"), memory_markdown(doc))


if __name__ == "__main__":
    main()
