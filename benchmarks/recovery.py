"""Recovery after pruning measured: protocol perplexity before and after, on WikiText-2 and another domain.

Each case prunes the default model (SmolLM2-135M) as the README's tables do, evaluates it (64
protocol windows of WikiText-2 test, and every window of the other-domain text), distils it from the
dense model for ``--steps`` steps (:func:`surgeon_export.api.recover`), and evaluates it again.
Time and peak memory per step are recorded with the threads used.

The other domain: the licence texts in ``benchmarks/data/licenses.txt.gz`` (GPL-3.0, Apache-2.0 and
GFDL-1.3 as Debian's base-files ships them in /usr/share/common-licenses; legal English, far from
Wikipedia prose; each licence permits verbatim copies).

    python -m benchmarks.recovery --cases s80 --threads 1 --out benchmarks/results/recovery_s80.json
    python -m benchmarks.recovery --cases s80 --data generated --out ...   # data-free
    python -m benchmarks.recovery --cases s80-between --out ...  # LoRA between shots, no final recovery
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import time
from pathlib import Path

import torch

from base.env import environment
from base.files import write_file
from surgeon.recover import RecoverConfig

OTHER_DOMAIN = Path(__file__).with_name("data") / "licenses.txt.gz"
CASES = {  # name -> build_config arguments (the README's settings for each row)
    "s80": dict(method="surgeon", structured=0.8, allocation="uniform", shots=3),
    "s90": dict(method="surgeon", structured=0.9, allocation="uniform", shots=3),
    "sgpt24-sds": dict(method="sparsegpt", pattern="2:4", sds=True),
    "u50": dict(method="surgeon", sparsity=0.5, shots=3),
    "w80": dict(method="wanda", structured=0.8, allocation="uniform"),  # cheap to prune: for quick checks
}


def other_domain_text(work: Path) -> Path:
    """The other-domain evaluation text as a plain file (decompressed once)."""
    out = work / "licenses.txt"
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.decompress(OTHER_DOMAIN.read_bytes()))
    return out


def evaluate(se, lm, other: Path) -> dict:
    wiki, _ = se.evaluate(lm, windows=64)
    legal, _ = se.evaluate(lm, text=other, windows=None)
    return {"wikitext": round(wiki.perplexity, 3), "other_domain": round(legal.perplexity, 3),
            "other_domain_windows": legal.windows}


def run_case(se, name: str, args: argparse.Namespace, other: Path) -> dict:
    spec = dict(CASES[name.removesuffix("-between")])
    sds = se.SDSConfig() if spec.pop("sds", False) else None
    lr = args.lr or (1e-3 if args.rank else RecoverConfig.lr)  # the product's defaults (docs/recovery.md)
    final = args.steps > 0 and not name.endswith("-between")  # a -between case measures the update between shots alone
    between = None
    if name.endswith("-between"):
        between = se.RecoverConfig(steps=args.between_steps, lr=1e-3, rank=args.rank or 8, seq_len=args.seq_len)
    teacher = se.load()
    if args.pruned is not None:  # a model this case's settings pruned earlier (e.g. the main job's out/pruned)
        lm = se.load(args.pruned)
        saved = json.loads((args.pruned / "surgeon_report.json").read_text())
        out = {"case": name, "pruned_from": str(args.pruned), "prune_config": saved.get("config"),
               "prune_seconds": saved.get("seconds"), "sparsity": saved.get("sparsity")}
    else:
        lm = se.load()
        t0 = time.perf_counter()
        report = se.prune(lm, se.build_config(spec.pop("method"), refine=sds, between_shots=between, **spec))
        out = {"case": name, "prune_config": report.config, "prune_seconds": round(time.perf_counter() - t0, 1),
               "sparsity": report.sparsity}
        if between is not None:
            out["between_shots"] = [s.get("between_shots") for s in report.shots]
    out["before"] = evaluate(se, lm, other)
    if final:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rcfg = se.RecoverConfig(steps=args.steps, lr=lr, rank=args.rank, seq_len=args.seq_len)
        t0, c0 = time.perf_counter(), time.process_time()
        train = se.recovery_windows(teacher, args.windows, seq_len=args.seq_len, data=args.data, seed=1)
        out["data"] = {"source": train.origin, "seconds": round(time.perf_counter() - t0, 1),
                       "cpu_seconds": round(time.process_time() - c0, 1)}  # generation is minutes; tokenising is not
        recovered = se.recover(lm, teacher, rcfg, windows=train, progress=args.progress)
        out["recover"] = recovered.to_dict()
        out["recover"]["peak_rss_mib_after"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["recover"]["peak_rss_mib_before"] = rss0
        out["after"] = evaluate(se, lm, other)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["s80"],
                        help=f"of {', '.join(CASES)}; NAME-between: LoRA between LLM Surgeon's shots instead")
    parser.add_argument("--steps", type=int, default=RecoverConfig.steps)
    parser.add_argument("--between-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=256)  # the product's --recover-windows
    parser.add_argument("--data", default="calibration", choices=["calibration", "generated"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recovery-bench"))
    parser.add_argument("--pruned", type=Path, default=None,
                        help="start from this pruned model directory (one case) instead of pruning")
    parser.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model (another run did)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import surgeon_export as se

    other = other_domain_text(args.work)
    result = {"environment": environment(), "threads": args.threads,
              "settings": vars(args) | {k: str(getattr(args, k)) for k in ("work", "out", "pruned")},
              "other_domain": "GPL-3.0 + Apache-2.0 + GFDL-1.3 licence texts (benchmarks/data/licenses.txt.gz)",
              "dense": None if args.skip_dense else evaluate(se, se.load(), other), "cases": []}
    for name in args.cases:
        result["cases"].append(run_case(se, name, args, other))
        write_file(args.out, json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result["cases"][-1].items() if k not in ("prune_config",)}
                         | {"recover": {k: v for k, v in result["cases"][-1].get("recover", {}).items() if k != "losses"}}))


if __name__ == "__main__":
    main()
