"""Do our checkpoints load the same in transformers 4.57 as in 5.x? Logits and 20 greedy tokens, both sides.

Writes two checkpoints of the default model (SmolLM2-135M-Instruct) with the code of this tree:

- ``equal``: 410 MLP channels zeroed in every layer (1126 kept, the main job's shape) and shrunk: the
  stock ``llama`` config;
- ``per_layer``: different channel counts per layer and one KV group removed in some layers: the
  per-layer format (``surgeon_llama``, ``modeling_surgeon.py``).

Then, in this interpreter (transformers 5.x), and in a second one with transformers 4.57 (a venv made with
``python3 -m venv --system-site-packages /work/venv457 && /work/venv457/bin/pip install "transformers==4.57.*"``):
tokenizer ids of a chat prompt, the logits of that prompt, and 20 greedy tokens (``generate``,
``do_sample=False``), also the way users call it, ``model.generate(**tokenizer(text, return_tensors="pt"))``
(the tokenizer's own inputs, ``token_type_ids`` included where it returns them). 4.57 loads ``equal`` with plain ``AutoModelForCausalLM`` and ``per_layer`` with
``trust_remote_code=True`` (the shipped ``modeling_surgeon.py``). A control copy of ``equal`` without
the top-level ``rope_theta`` shows what 4.57 did before (RoPE theta 10,000 instead of 100,000).

Usage: ``PYTHONPATH=. python3 benchmarks/transformers_457_check.py --python457 /work/venv457/bin/python``
(1 thread); the result goes to ``benchmarks/results/transformers_457_check.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Explain in one sentence why smaller language models are useful."

# Runs under either transformers generation: torch and transformers only.
LOADER = r'''
import json, sys
import torch
torch.set_num_threads(1)
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

prompt, out = sys.argv[1], {"transformers": transformers.__version__, "torch": torch.__version__}
import tokenizers
out["tokenizers"] = tokenizers.__version__
for spec in sys.argv[2:]:
    name, directory, trust = spec.split("=")
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust == "remote", dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0].double()
        gen = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
        try:  # as users call it: every input the tokenizer returns
            from_kwargs = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
            from_kwargs = from_kwargs[0, ids.shape[1]:].tolist()
        except Exception as exc:
            from_kwargs = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    out[name] = {"tokenizer_class": type(tok).__name__, "model_class": type(model).__module__ + "." + type(model).__name__,
                 "tokenizer_outputs": sorted(enc.keys()), "greedy_from_tokenizer_kwargs": from_kwargs,
                 "rope_theta": getattr(model.config, "rope_theta", None) or (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta"),
                 "ids": ids[0].tolist(), "logits": logits.tolist(), "greedy": gen[0, ids.shape[1]:].tolist()}
print("\nRESULT " + json.dumps(out))
'''


def build(root: Path) -> dict[str, Path]:
    """The two checkpoints (and the control copy) written by this tree's code."""
    import torch

    from base.adapters import get_adapter
    from base.loading import load_model
    from base.surgery import LayerPlan, RemovalPlan, layer_shapes, zero_groups_
    from export.pruned import ShrinkConfig, shrink_and_save
    from export.shapes import magnitude_costs

    torch.set_num_threads(1)
    dirs = {}
    for name in ("equal", "per_layer"):
        lm = load_model(None)
        adapter = get_adapter("llama")
        costs = magnitude_costs(lm.model, adapter)
        plan = RemovalPlan()
        for i, shape in enumerate(layer_shapes(lm.model, adapter)):
            cut = 410 if name == "equal" else 200 + 17 * i
            channels = torch.argsort(costs[i].channels)[:cut].tolist()
            kv = [i % 3] if name == "per_layer" and i % 4 == 0 else []
            plan.layers[i] = LayerPlan.of(channels, kv_groups=kv)
        zero_groups_(lm.model, adapter, plan)
        dirs[name] = root / name
        shrink_and_save(lm.model, lm.tokenizer, adapter, dirs[name], ShrinkConfig(),
                        report={"model": lm.source, "plan": f"transformers_457_check {name}"}, source_dir=lm.path)
    control = root / "equal_without_top_level_rope_theta"
    shutil.copytree(dirs["equal"], control)
    config = json.loads((control / "config.json").read_text())
    config.pop("rope_theta")
    (control / "config.json").write_text(json.dumps(config, indent=2))
    dirs["control"] = control
    return dirs


def run(python: str, dirs: dict[str, Path], env_home: Path) -> dict:
    specs = [f"equal={dirs['equal']}=stock", f"per_layer={dirs['per_layer']}=remote", f"control={dirs['control']}=stock"]
    command = [python, "-I", "-c", LOADER, PROMPT, *specs]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(env_home),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["prompted_for_remote_code"] = "Do you wish to run the custom code" in done.stdout + done.stderr
    return result


def compare(new: dict, old: dict) -> dict:
    import torch

    out = {}
    for name in ("equal", "per_layer", "control"):
        a, b = new[name], old[name]
        la, lb = torch.tensor(a["logits"]), torch.tensor(b["logits"])
        same_ids = a["ids"] == b["ids"]
        out[name] = {
            "same_token_ids": same_ids,
            "max_abs_logit_diff": float((la - lb).abs().max()) if same_ids else None,
            "logit_scale": float(la.abs().max()),
            "same_greedy_20": a["greedy"] == b["greedy"],
            "tokenizer_outputs": {"5x": a.get("tokenizer_outputs"), "4.57": b.get("tokenizer_outputs")},
            # generate(**tokenizer(...)) gives the same 20 tokens as generate(ids), or the error it raised
            "generate_from_tokenizer_kwargs": {v: True if r.get("greedy_from_tokenizer_kwargs") == r["greedy"]
                                               else r.get("greedy_from_tokenizer_kwargs") for v, r in (("5x", a), ("4.57", b))},
            "greedy_5x": a["greedy"], "greedy_457": b["greedy"],
            "rope_theta_5x": a["rope_theta"], "rope_theta_457": b["rope_theta"],
            "classes": {"5x": [a["model_class"], a["tokenizer_class"]], "4.57": [b["model_class"], b["tokenizer_class"]]},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python457", default="/work/venv457/bin/python")
    parser.add_argument("--work", help="keep the checkpoints here (reused when present)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformers_457_check.json"))
    args = parser.parse_args()
    from base.env import environment

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        names = {"equal": "equal", "per_layer": "per_layer", "control": "equal_without_top_level_rope_theta"}
        dirs = {k: root / v for k, v in names.items()}
        if not all(d.is_dir() for d in dirs.values()):
            dirs = build(root)
        new = run(sys.executable, dirs, root / "hf")
        old = run(args.python457, dirs, root / "hf")
        config_keys = {n: {k: v for k, v in json.loads((d / "config.json").read_text()).items()
                           if k in ("model_type", "rope_theta", "rope_parameters", "auto_map")} for n, d in dirs.items()}
        tok_class = json.loads((dirs["equal"] / "tokenizer_config.json").read_text())["tokenizer_class"]
    result = {
        "command": f"PYTHONPATH=. python3 benchmarks/transformers_457_check.py --python457 {args.python457}",
        "venv": "python3 -m venv --system-site-packages /work/venv457 && /work/venv457/bin/pip install 'transformers==4.57.*'",
        "prompt": PROMPT, "threads": 1, "environment": environment(),
        "versions": {"new": {k: new[k] for k in ("transformers", "tokenizers", "torch")},
                     "old": {k: old[k] for k in ("transformers", "tokenizers", "torch")}},
        "prompted_for_remote_code": {"new": new["prompted_for_remote_code"], "old": old["prompted_for_remote_code"]},
        "config_keys": config_keys, "tokenizer_class_written": tok_class,
        "comparison": compare(new, old),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.startswith("greedy")}
                      for k, v in result["comparison"].items()}, indent=2))


if __name__ == "__main__":
    main()
