"""The GPU checks of the sparse-formats issue as one short script, for a session lent a CUDA GPU.

The default model cannot travel to the GPU machine (its GGUF is larger than what a device call
carries), and 2:4 kernel speed and memory depend on shapes alone, so the end-to-end part runs a
model of the default model's exact configuration with seeded random weights, magnitude-pruned to
2:4 (its perplexity means nothing and is not measured). Two steps::

    # here, where the default model is installed: its config and tokenizer (a few MB), ignored by git
    echo /.gpu/ >> .git/info/exclude; python -m benchmarks.gpu_check prepare .gpu
    # there, in one device call (carry .gpu), about 5 minutes on an H100/H200:
    python -m benchmarks.gpu_check run .gpu --out "$OUT"

``run`` does, in order, each step's failure recorded without stopping the next:

1. ``pytest -m gpu tests`` (the semi-structured kernels against dense; the auto policy), log in
   ``pytest.log``;
2. ``benchmarks.sparse_formats``: 2:4 against dense float16 linears of the default model's and a 7B
   model's shapes, 1 to 4096 tokens (``sparse_formats.json``/``.md``);
3. the default model's configuration, 2:4, float16: ``surgeon-export bench`` of the dense checkpoint
   (``torch``) against its 2:4 pack on ``torch-24`` (measured dispatch) and ``torch-24-sparse``
   (2:4 everywhere), prefill 1x128 to 16x2048 and decode batch 1 to 64, peak GPU memory per cell
   (``e2e.json``/``.md``, plots dropped to stay within the files a call returns).

``summary.json`` says which steps passed. Commit the files under ``benchmarks/results/gpu/`` with
the device named (it is in every JSON's environment block).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from base.files import write_file

PREFILL = [(1, 128), (1, 2048), (8, 512), (16, 2048)]
DECODE = [1, 8, 32, 64]


def prepare(spec: str | None, out: Path) -> None:
    """Config and tokenizer of ``spec`` (default: the default model) into ``out``, no weights."""
    from base.loading import load_model

    lm = load_model(spec)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.config.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"source": lm.source, "model_type": lm.model.config.model_type}))


def build_24_model(spec: Path, work: Path, device: torch.device, seed: int = 0) -> tuple[Path, Path]:
    """The model of ``spec``'s config with seeded random weights, every decoder linear magnitude-2:4,
    saved as a float16 checkpoint, and its 2:4 pack (float16). Returns both directories."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from base.adapters import get_adapter
    from base.loading import load_model
    from base.patterns import NMPattern
    from export.sparse_checkpoint import PackConfig, pack_checkpoint

    config = AutoConfig.from_pretrained(spec, local_files_only=True, trust_remote_code=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).to(device).eval()
    with torch.no_grad():
        for linear in get_adapter(config.model_type).decoder_linears(model).values():
            linear.weight.mul_(NMPattern().mask_from_scores(linear.weight.abs().float()).to(linear.weight.dtype))
    dense = work / "dense24"
    model.save_pretrained(dense)
    AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=False).save_pretrained(dense)
    del model
    packed = work / "packed24"
    pack_checkpoint(load_model(dense), packed, PackConfig("2:4", "float16"))
    return dense, packed


def _step(summary: dict, name: str, fn) -> None:  # noqa: ANN001
    start = time.perf_counter()
    try:
        fn()
        summary[name] = {"ok": True}
    except Exception as exc:  # noqa: BLE001  (every step's failure is recorded; the next one runs)
        summary[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    summary[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {'ok' if summary[name]['ok'] else summary[name]['error']} "
          f"({summary[name]['seconds']} s)", flush=True)


def run(spec: Path, out: Path, device: str = "cuda", quick: bool = False, steps: tuple[str, ...] = ("tests", "layers", "e2e")) -> dict:
    """The checks of the module docstring; ``quick`` shrinks the grid (for testing this script on CPU)."""
    from benchmarks import sparse_formats
    from benchmarks.run import BenchConfig, ModelSpec, bench

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))  # models stay out of $OUT: only results come back
    summary: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "spec": json.loads((spec / "source.json").read_text())}

    def tests() -> None:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, check=False)
        (out / "pytest.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}")

    def layers() -> None:
        sparse_formats.main(["--out", str(out / "sparse_formats.json"), "--repeat", "5" if quick else "7"])

    def e2e() -> None:
        dense, packed = build_24_model(spec, work, torch.device(device))
        grid = dict(prefill=[(1, 16)], decode=[1], prompt_len=8, new_tokens=2) if quick else \
            dict(prefill=PREFILL, decode=DECODE, prompt_len=128, new_tokens=32)
        cfg = BenchConfig(models=[ModelSpec("dense", str(dense), "torch"), ModelSpec("2:4", str(packed), "torch-24"),
                                  ModelSpec("2:4-sparse", str(packed), "torch-24-sparse")],
                          device=device, ppl=None, repeat=5, warmup=1, progress=False, **grid)  # type: ignore[arg-type]
        result = bench(cfg, out / "e2e.json", force=True)
        for plot in result["outputs"]["plots"]:  # names beside the JSON
            (out / plot).unlink(missing_ok=True)

    try:
        for name, fn in (("tests", tests), ("layers", layers), ("e2e", e2e)):
            if name in steps:
                _step(summary, name, fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_file(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the config and tokenizer the GPU run needs")
    p.add_argument("out", type=Path)
    p.add_argument("--model", default=None, help="model spec (default: the default model)")
    r = sub.add_parser("run", help="run the checks (on the GPU machine)")
    r.add_argument("spec", type=Path, help="the directory `prepare` wrote")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--quick", action="store_true", help="a tiny grid (to test this script)")
    r.add_argument("--steps", default="tests,layers,e2e", help="comma-separated subset of tests,layers,e2e")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.model, args.out)
        return 0
    if not (args.spec / "source.json").is_file():
        parser.error(f"{args.spec} was not written by `python -m benchmarks.gpu_check prepare`")
    summary = run(args.spec, args.out, args.device, args.quick, tuple(args.steps.split(",")))
    return 0 if all(s["ok"] for k, s in summary.items() if isinstance(s, dict) and "ok" in s) else 1


if __name__ == "__main__":
    raise SystemExit(main())
