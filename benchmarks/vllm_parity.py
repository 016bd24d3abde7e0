"""vLLM against torch on the same models: greedy tokens, log-probabilities, perplexity.

For each model (``LABEL=PATH``, ``default`` for the default model), the torch reference runs here
(float32, the project's environment) and vLLM (the ``vllm`` backend, float32) in a child process of
vLLM's own environment (``--serve``: one engine per model, one JSON line per model). A checkpoint in
the Nemotron-NAS layout (``LABEL=NAS_DIR@TORCH_DIR``: ``shrink TORCH_DIR --layout nemotron-nas --out
NAS_DIR``) is served by stock vLLM with nothing of ours (:func:`served_stock`, ``benchmarks/vllm_stock.py``:
plugins off, isolated Python, no module of ours imported) and compared with torch on ``TORCH_DIR``:

- greedy: ``--new-tokens`` tokens from each of :data:`PROMPTS`, vLLM's scheduler against torch's
  decode loop; identical or the first position that differs;
- log-probabilities: the largest |difference| at the last position of the first protocol window
  (full vocabulary) and of each window token's own log-probability (vLLM's prompt log-probs);
- perplexity: the first ``--windows`` protocol windows (WikiText-2 test, 512 tokens), relative difference.

    python -m benchmarks.vllm_parity --threads 2 --out benchmarks/results/vllm_parity.json \\
        dense=default uniform=out/wanda-s80 per-layer=out/wanda-s80-global nemotron-nas=out/wanda90-mlp-nas@out/wanda90-mlp

``--mlp-only PRUNED OUT`` writes the per-layer model of the Nemotron-NAS row (:func:`mlp_only`).

The tests (tests/test_vllm.py) use ``--serve`` on tiny models and compare with torch themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STOCK = Path(__file__).with_name("vllm_stock.py")  # stock vLLM with nothing of ours
OURS = ("base", "surgeon", "export", "runtime", "benchmarks", "surgeon_export")  # our top-level packages (pyproject)
STOCK_MAX_MODEL_LEN = 2048
STOCK_KV_CACHE_BYTES = 256 * 2**20  # 5,600 tokens of the default model in float32
PROMPTS = ["The history of the city of Paris begins", "Photosynthesis is the process by which",
           "def fibonacci(n):"]


def serve(request: dict, replies: object) -> None:
    """In vLLM's environment: every model of ``request`` on the ``vllm`` backend, one JSON line each.

    ``request``: ``models`` (paths or None), ``prompts`` (token ids), ``new_tokens``, ``window`` (token
    ids), ``full`` (also every position's log-probabilities of the window), ``ppl`` (``ids`` or None for
    the evaluation text, ``seq_len``, ``windows``), ``threads``. A model vLLM refuses gets ``error``.
    """
    from base.data import eval_tokens
    from base.errors import SurgeonError
    from base.perplexity import perplexity
    from runtime.backend import load_backend
    from runtime.generate import GenerationConfig, generate

    for path in request["models"]:
        try:
            backend = load_backend("vllm", path, threads=request["threads"])
        except SurgeonError as exc:  # a refused model: its one line
            _reply(replies, {"path": path, "error": str(exc)})
            continue
        prompts = request["prompts"]
        greedy = generate(backend, prompts, GenerationConfig(max_new_tokens=request["new_tokens"]))
        sampled = [generate(backend, prompts, GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, seed=s)).tokens
                   for s in (0, 0, 1)]
        window = torch.tensor([request["window"]])
        backend.reset(1)
        last = backend.forward(window, torch.ones_like(window), torch.arange(window.shape[1])[None], last_only=True)
        ppl = request["ppl"]
        ids = torch.tensor(ppl["ids"]) if ppl["ids"] is not None else eval_tokens(backend.tokenizer, None, None).ids
        result = perplexity(backend, ids, seq_len=ppl["seq_len"], max_windows=ppl["windows"], progress=False)
        _reply(replies, {
            "path": path, "greedy": greedy.tokens, "sampled": sampled, "last_logprobs": last[0, -1].tolist(),
            "token_logprobs": backend.token_logprobs(window)[0].tolist(),
            "logprobs": backend.logits(window)[0].tolist() if request.get("full") else None,
            "perplexity": result.perplexity, "describe": backend.describe(),
        })
        del backend


def _reply(replies: object, value: dict) -> None:
    replies.write(json.dumps(value) + "\n")  # type: ignore[attr-defined]
    replies.flush()  # type: ignore[attr-defined]


def served(request: dict) -> list[dict]:
    """:func:`serve` run in a child process of vLLM's environment; its replies (a RuntimeError with the
    child's stderr if it fails)."""
    from runtime.vllm_env import backend_python, worker_env

    python = backend_python() or sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "request.json"
        file.write_text(json.dumps(request))
        run = subprocess.run([python, "-m", "benchmarks.vllm_parity", "--serve", str(file)], capture_output=True,
                             text=True, env={**worker_env(), "OMP_NUM_THREADS": str(request["threads"])})
    if run.returncode != 0:
        raise RuntimeError(f"vLLM side failed:\n{run.stderr[-4000:]}")
    return [json.loads(line) for line in run.stdout.splitlines()]


def served_stock(request: dict) -> dict:
    """``benchmarks/vllm_stock.py`` on ``request`` (its docstring) in vLLM's environment: isolated Python
    (``-I``: no ``PYTHONPATH``, not this checkout), plugins off; its reply (a RuntimeError with the
    child's stderr if it fails)."""
    from runtime.vllm_env import backend_python

    python = backend_python() or sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "request.json"
        file.write_text(json.dumps({"max_model_len": STOCK_MAX_MODEL_LEN, "kv_cache_bytes": STOCK_KV_CACHE_BYTES,
                                    **request, "ours": list(OURS)}))
        run = subprocess.run([python, "-I", str(STOCK), str(file)], capture_output=True, text=True, cwd=tmp,
                             env={**env, "VLLM_PLUGINS": "", "OMP_NUM_THREADS": str(request["threads"])})
    if run.returncode != 0:
        raise RuntimeError(f"stock vLLM failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.splitlines()[-1])


class Replayed:
    """A scorer that gives back the token log-probabilities another process computed for these windows, so
    :func:`base.perplexity.perplexity` scores them as it scores every backend."""

    def __init__(self, windows: list[list[int]], logprobs: list[list[float]]) -> None:
        self.table = {tuple(w): lp for w, lp in zip(windows, logprobs)}

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a replayed scorer has each token's log-probability only")

    def token_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.table[tuple(row)] for row in input_ids.tolist()], dtype=torch.float64)  # [B, T - 1]


def stock_perplexity(got: dict, ids: torch.Tensor, windows: list[list[int]], seq_len: int, count: int | None) -> float:
    """The protocol perplexity of :func:`served_stock`'s ``window_logprobs`` for ``windows`` (cut from ``ids``)."""
    from base.perplexity import perplexity

    return perplexity(Replayed(windows, got["window_logprobs"]), ids, seq_len=seq_len, max_windows=count,
                      progress=False).perplexity


def mlp_only(pruned: Path, out: Path, align: int = 1) -> dict:
    """The MLP channels a structured Wanda or magnitude run removed (``pruned``'s ``removal``: these
    baselines update no weight), cut from the default model (its source) with every attention head
    kept; ``align`` rounds the widths up (:class:`export.pruned.ShrinkConfig`). A per-layer model that
    fits the Nemotron-NAS layout: those runs remove query heads too, and no option prunes MLP channels only."""
    from base.formats import REPORT_FILE
    from base.loading import load_model
    from base.surgery import LayerPlan, RemovalPlan
    from export.pruned import ShrinkConfig, shrink_and_save

    report = json.loads((pruned / REPORT_FILE).read_text())
    if report["config"].get("scoring") not in ("wanda", "magnitude") or "removal" not in report:
        raise SystemExit(f"{pruned}: not a structured Wanda or magnitude run (LLM Surgeon updates the weights it keeps)")
    lm = load_model(None)
    if report["model"] != lm.source:
        raise SystemExit(f"{pruned} was pruned from {report['model']}, not the default model")
    removal = RemovalPlan.from_dict(report["removal"])
    plan = RemovalPlan({i: LayerPlan.of(channels=p.channels) for i, p in removal.layers.items() if p.channels})
    return shrink_and_save(lm.model, lm.tokenizer, lm.adapter, out, ShrinkConfig(align=align), plan=plan,
                           report={"model": lm.source, "plan": f"the MLP channels {pruned} removed, every head kept"})


def compare(label: str, spec: str, got: dict, threads: int, windows: int, new_tokens: int, window: list[int],
            prompts: list[list[int]]) -> dict:
    """torch's side for one model and the differences to vLLM's ``got``."""
    from base.data import eval_tokens
    from base.perplexity import perplexity
    from runtime.backend import load_backend
    from runtime.generate import GenerationConfig, generate

    ref = load_backend("torch", None if spec == "default" else spec, threads=threads)
    want = generate(ref, prompts, GenerationConfig(max_new_tokens=new_tokens)).tokens
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(want, got["greedy"])]
    ids = torch.tensor([window])
    expected = torch.log_softmax(ref.logits(ids)[0], dim=-1)  # [T, V]
    own = expected[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    ppl = perplexity(ref, eval_tokens(ref.tokenizer, None, None).ids, seq_len=len(window), max_windows=windows,
                     progress=False).perplexity
    return {"label": label, "spec": spec, "artefact": got["describe"],
            "greedy": {"prompts": len(prompts), "new_tokens": new_tokens, "identical": want == got["greedy"],
                       "first_difference": first_diff, "torch": want, "vllm": got["greedy"]},
            "logprobs": {"last_position_max_abs_difference": float((torch.tensor(got["last_logprobs"]) - expected[-1]).abs().max()),
                         "token_max_abs_difference": float((torch.tensor(got["token_logprobs"]) - own).abs().max())},
            "perplexity": {"windows": windows, "seq_len": len(window), "torch": ppl, "vllm": got["perplexity"],
                           "relative_difference": got["perplexity"] / ppl - 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="LABEL=PATH (PATH a model directory or 'default')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the vLLM side (a request file)
    parser.add_argument("--mlp-only", nargs=2, type=Path, metavar=("PRUNED", "OUT"), help="write mlp_only(PRUNED) to OUT")
    parser.add_argument("--align", type=int, default=1, help="--mlp-only: round the MLP widths up to multiples of this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mlp_only is not None:
        written = mlp_only(*args.mlp_only, align=args.align)
        print(f"{args.mlp_only[1]}: MLP widths {[layer['intermediate_size'] for layer in written['layers']]}, "
              f"{written['shrink']['remaining_fraction']:.2%} of decoder-linear weights")
        return
    if args.serve is not None:
        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # stray prints go to stderr; stdout carries the replies only
        serve(json.loads(args.serve.read_text()), replies)
        return
    from base.data import eval_tokens
    from base.env import environment
    from base.loading import load_tokenizer, resolve_model_dir
    from base.perplexity import eval_windows

    models = dict(m.split("=", 1) for m in args.models)
    stock = {label: spec.split("@", 1) for label, spec in models.items() if "@" in spec}  # NAS_DIR, TORCH_DIR
    ours = {label: spec for label, spec in models.items() if label not in stock}
    tokenizer = load_tokenizer(resolve_model_dir(next(iter(models.values())).split("@")[-1])[0])
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids = eval_tokens(tokenizer, None, None).ids
    window = ids[:512].tolist()
    replies = dict(zip(ours, served({"models": [None if v == "default" else v for v in ours.values()],
                                     "prompts": prompts, "new_tokens": args.new_tokens, "window": window,
                                     "full": False, "threads": args.threads,
                                     "ppl": {"ids": None, "seq_len": len(window), "windows": args.windows}})
                              if ours else []))
    ppl_windows = eval_windows(ids, len(window), args.windows).tolist()
    for label, (nas, _) in stock.items():
        got = served_stock({"model": nas, "prompts": prompts, "new_tokens": args.new_tokens, "window": window,
                            "windows": ppl_windows, "threads": args.threads})
        if got["describe"]["ours_imported"]:
            raise SystemExit(f"{label}: stock vLLM imported modules of ours: {got['describe']['ours_imported']}")
        replies[label] = {**got, "perplexity": stock_perplexity(got, ids, ppl_windows, len(window), args.windows)}
    rows = [compare(label, stock[label][1] if label in stock else spec, replies[label], args.threads, args.windows,
                    args.new_tokens, window, prompts) | ({"served_from": stock[label][0], "route": "stock vLLM, no plugin"}
                                                         if label in stock else {"route": "vllm backend"})
            for label, spec in models.items()]
    doc = {"kind": "vllm parity", "environment": {**environment("cpu"), "vllm": rows[0]["artefact"]["vllm"]["version"],
                                                  "transformers_vllm_side": "5.19.0"},
           "threads": args.threads, "models": rows}
    assert args.out is not None, "--out is required"
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['label']}: greedy identical {r['greedy']['identical']} ({r['greedy']['first_difference']}), "
              f"ppl torch {r['perplexity']['torch']:.4f} vLLM {r['perplexity']['vllm']:.4f} "
              f"({100 * r['perplexity']['relative_difference']:+.4f}%), max |dlogprob| last "
              f"{r['logprobs']['last_position_max_abs_difference']:.2e}, tokens {r['logprobs']['token_max_abs_difference']:.2e}")


if __name__ == "__main__":
    main()
