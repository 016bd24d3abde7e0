"""llama.cpp against torch on the same model: greedy tokens, logits, protocol perplexity, tokenisation.

For each variant (a model directory converted to an F32 or F16 GGUF, or a given ``.gguf`` file such as a
Q8_0 one), on the backends ``generate`` and ``bench`` use:

- greedy: 32 new tokens from a fixed prompt, llama.cpp's against torch's (float32): how many agree
  before the first difference;
- logits: the largest |difference| over one 512-token protocol window, and its scale;
- perplexity: the first ``windows`` protocol windows (WikiText-2 test, 512 tokens), relative difference;
- tokenisation: llama.cpp's own tokeniser (``llama_tokenize``) against transformers' on the first
  20,000 characters of the evaluation text.

    python -m benchmarks.llama_cpp_parity --threads 2 --out benchmarks/results/llama_cpp_parity.json \\
        f32=default f16=default@float16 q8_0=out/dense-q8/model.gguf structured=out/wanda-s80

A spec is ``LABEL=PATH[@DTYPE]`` (PATH a directory, ``default`` or a ``.gguf`` file). The torch
reference of every variant is its source directory in float32 (a ``.gguf`` file's tokenizer directory).
The tests (tests/test_llama_cpp.py, ``slow``) call :func:`parity` and assert the bounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from base.data import eval_tokens
from base.env import environment
from base.files import write_file
from base.perplexity import perplexity
from runtime.backend import Backend, load_backend
from runtime.generate import GenerationConfig, generate

PROMPT = "The history of the city of Paris begins"
TOKENIZER_CHARS = 20_000


def greedy_agreement(ref: Backend, cpp: Backend, new_tokens: int = 32) -> dict:
    """Greedy continuations of :data:`PROMPT` on both backends and how many tokens agree from the start."""
    ids = [ref.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    a, b = generate(ref, ids, cfg).tokens[0], generate(cpp, ids, cfg).tokens[0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"new_tokens": new_tokens, "identical": a == b, "agreeing_prefix": same, "torch": a, "llama_cpp": b}


def tokenizer_agreement(cpp: Backend, chars: int = TOKENIZER_CHARS) -> dict:
    """llama.cpp's tokenisation of the evaluation text's start against transformers' (the ids the protocol uses)."""
    from base.data import EVAL_FILE, corpus

    found = corpus(EVAL_FILE, None)
    assert found is not None
    text = found[0][:chars]
    hf = cpp.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    mine = cpp.tokenize(text)  # type: ignore[attr-defined]
    first = next((i for i, (x, y) in enumerate(zip(hf, mine)) if x != y), None)
    return {"characters": len(text), "transformers_tokens": len(hf), "llama_cpp_tokens": len(mine),
            "identical": hf == mine, "first_difference": first}


def window_perplexity(backend: Backend, windows: int = 8, seq_len: int = 512, batch_size: int = 4) -> dict:
    """Perplexity of the first ``windows`` protocol windows, with the seconds it took."""
    ids = eval_tokens(backend.tokenizer, None, None).ids
    t0 = time.perf_counter()
    result = perplexity(backend, ids, seq_len=seq_len, max_windows=windows, batch_size=batch_size, progress=False)
    return {"perplexity": result.perplexity, "tokens": result.tokens, "seconds": time.perf_counter() - t0}


def parity(ref: Backend, cpp: Backend, windows: int = 8, seq_len: int = 512, batch_size: int = 4,
           reference: dict | None = None) -> dict:
    """Greedy tokens, one window's logits, perplexity on ``windows`` protocol windows, tokenisation.

    ``reference``: torch's :func:`window_perplexity` when already measured (tests compare several files
    with one reference)."""
    ids = eval_tokens(ref.tokenizer, None, None).ids
    window = ids[:seq_len][None]
    a, b = ref.logits(window), cpp.logits(window)
    out = {"greedy": greedy_agreement(ref, cpp),
           "logits": {"max_abs_difference": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
                      "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())},
           "tokenizer": tokenizer_agreement(cpp)}
    if windows > 0:  # 0: no perplexity (the bench runner measures it too)
        ppl = {"torch": reference or window_perplexity(ref, windows, seq_len, batch_size),
               "llama_cpp": window_perplexity(cpp, windows, seq_len, batch_size)}
        ppl["relative_difference"] = ppl["llama_cpp"]["perplexity"] / ppl["torch"]["perplexity"] - 1
        ppl["windows"], ppl["seq_len"] = windows, seq_len
        out["perplexity"] = ppl
    return out


def run(spec: str, threads: int, windows: int) -> dict:
    """One ``LABEL=PATH[@DTYPE]`` variant against its torch reference."""
    label, _, rest = spec.partition("=")
    path, _, dtype = rest.partition("@")
    cpp = load_backend("llama.cpp", path, dtype=dtype or "auto", threads=threads)
    reference = None if path == "default" else (path if not path.endswith(".gguf") else str(cpp.directory))
    ref = load_backend("torch", reference, threads=threads)
    facts = cpp.describe()
    result = parity(ref, cpp, windows=windows)
    return {"label": label, "spec": spec, "torch_reference": reference or "default", "artefact": facts, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="LABEL=PATH[@DTYPE]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (0: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for variant in args.variants:  # the file is rewritten after every variant: a long run keeps what it did
        r = run(variant, args.threads, args.windows)
        rows.append(r)
        doc = {"kind": "llama.cpp parity", "environment": {**environment("cpu"), "llama_cpp_python":
                                                           r["artefact"]["llama_cpp"]["llama_cpp_python"]},
               "threads": args.threads, "variants": rows}
        write_file(args.out, json.dumps(doc, indent=2) + "\n")
        p = r.get("perplexity")
        ppl = (f"ppl torch {p['torch']['perplexity']:.3f} llama.cpp {p['llama_cpp']['perplexity']:.3f} "
               f"({100 * p['relative_difference']:+.3f}%), ") if p else ""
        print(f"{r['label']}: greedy {r['greedy']['agreeing_prefix']}/{r['greedy']['new_tokens']}, {ppl}"
              f"max |dlogit| {r['logits']['max_abs_difference']:.2e}, tokenizer identical {r['tokenizer']['identical']}",
              flush=True)


if __name__ == "__main__":
    main()
