"""The ``vllm`` backend (runtime/vllm.py) and our vLLM plugin (runtime/vllm_plugin.py) against torch.

vLLM runs in its own environment (``surgeon-export vllm-setup``, runtime/vllm_env.py; CI creates
it), so the vLLM side runs in a child process of that environment's Python
(:func:`benchmarks.vllm_parity.served`, one engine per model) and the torch side here. Tiny models
(head_dim 32: vLLM's CPU attention takes 32, 64, 80, ... only): the dense stock Llama and a uniformly
shrunk one through stock vLLM, a per-layer-shape Llama, Qwen2, Qwen3, Gemma, Gemma2 and Gemma3
(different MLP widths, query heads and KV heads per layer) and OPT (MLP widths and heads) through the
plugin. Greedy tokens equal torch's (float32, 3 prompts x 32 tokens),
log-probabilities (last position, every position, each token's) within :data:`ATOL`, perplexity
within 1e-5 relative; ``generate --backend vllm`` on the CLI and ``bench --backend vllm`` run it.
And a checkpoint in the Nemotron-NAS layout (``shrink --layout nemotron-nas``) served by stock vLLM
with nothing of ours (plugins off, isolated Python: :func:`benchmarks.vllm_parity.served_stock`)
against torch on the per-layer checkpoint it was written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from base.adapters import get_adapter
from base.loading import load_model
from base.perplexity import eval_windows, perplexity
from base.surgery import LayerPlan, RemovalPlan
from benchmarks import vllm_parity
from export.pruned import ShrinkConfig, shrink_and_save
from runtime.backend import backend_python
from runtime.generate import GenerationConfig, generate
from runtime.torch_backend import TorchBackend
from runtime.vllm_env import worker_env
from tests.cli_runner import run_cli_process
from tests.conftest import make_tokenizer
from tests.test_gguf_export import PER_LAYER_PLAN, PER_LAYER_SIZES, per_layer
from tests.test_nemotron_nas import NAS_BLOCKS, write_nas
from tests.test_surgery import make_model

# Measured here: largest |log-prob difference| vLLM vs torch about 1e-6 (float32, summation order);
# the bound leaves room for other CPUs' kernels.
ATOL = 1e-4
# Gemma (v1): ours 7.7e-5, and stock vLLM's GemmaForCausalLM on the dense tiny Gemma 5.5e-5
# (benchmarks/results/vllm_parity_tiny_gemma.json): vLLM's own difference from transformers there, not the
# plugin's; the bound keeps room above both. (OPT: ours 1.9e-6, stock 2.9e-6: vllm_parity_tiny_opt.json.)
TOLERANCE = {"gemma": 3e-4}
PROMPTS = [[5, 17, 40, 99, 3, 250, 61], [7, 8], [300, 12, 12, 12, 55, 91, 2, 140, 33, 8, 19]]
WINDOW = [(7 * i * i + 3 * i + 11) % 320 for i in range(24)]
NEW_TOKENS = 32
SHAPE = dict(head_dim=32, initializer_range=0.4, max_position_embeddings=128)  # a head size vLLM's CPU build runs; spread logits
# OPT has no head_dim of its own (hidden size over heads): 192 / 6 gives vLLM's CPU attention its 32; projections
# in and out kept (64 < 192); OPT draws its weights with init_std: 0.2 spreads logits so the three prompts' greedy
# continuations differ (at 0.02, or 32 wide projections, every prompt repeats one token)
OPT_SHAPE = dict(hidden_size=192, word_embed_proj_dim=64, init_std=0.2, max_position_embeddings=128)
OPT_PLAN = RemovalPlan({0: LayerPlan.of(channels=range(5)), 1: LayerPlan.of(heads=[1]),
                        2: LayerPlan.of(channels=range(9), heads=[0, 3])})  # MLP widths and heads differ
GEMMAS = ("gemma", "gemma2", "gemma3_text")
UNIFORM_PLAN = RemovalPlan({i: LayerPlan.of(channels=range(3 * i, 3 * i + 8), heads=[2, 5]) for i in range(3)})


def save(model, tok, out: Path) -> Path:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tok = make_tokenizer(vocab_size=320)
    root = tmp_path_factory.mktemp("vllm")
    dense = save(make_model("llama", dtype=torch.float32, vocab_size=len(tok), **SHAPE), tok, root / "dense")
    uniform = make_model("llama", dtype=torch.float32, vocab_size=len(tok), **SHAPE)
    shrink_and_save(uniform, tok, get_adapter("llama"), root / "uniform", ShrinkConfig(check_tokens=0, uniform=True),
                    plan=UNIFORM_PLAN)
    return {"dense": dense, "uniform": root / "uniform",
            "per-layer": per_layer("llama", tok, root, PER_LAYER_PLAN, **SHAPE),
            "qwen2": per_layer("qwen2", tok, root, PER_LAYER_PLAN, **SHAPE),
            "qwen3": per_layer("qwen3", tok, root, PER_LAYER_PLAN, **SHAPE),
            **{family: per_layer(family, tok, root, PER_LAYER_PLAN, **SHAPE) for family in GEMMAS},
            "opt": per_layer("opt", tok, root, OPT_PLAN, **OPT_SHAPE)}


@pytest.fixture(scope="module")
def served(models: dict[str, Path]) -> dict[str, dict]:
    """What vLLM gave for each model (one child process in vLLM's environment, one engine per model)."""
    assert backend_python("vllm") is not None, "vLLM is installed in the test environment itself; these tests expect its own"
    replies = vllm_parity.served({"models": [str(p) for p in models.values()], "prompts": PROMPTS, "window": WINDOW,
                                  "new_tokens": NEW_TOKENS, "full": True, "threads": 1,
                                  "ppl": {"ids": WINDOW * 3, "seq_len": len(WINDOW), "windows": None}})
    return {label: reply for label, reply in zip(models, replies)}


def torch_reference(path: Path) -> TorchBackend:
    return TorchBackend.of(load_model(path))


ARCHITECTURES = {"dense": "LlamaForCausalLM", "uniform": "LlamaForCausalLM", "per-layer": "SurgeonLlamaForCausalLM",
                 "qwen2": "SurgeonQwen2ForCausalLM", "qwen3": "SurgeonQwen3ForCausalLM",
                 "gemma": "SurgeonGemmaForCausalLM", "gemma2": "SurgeonGemma2ForCausalLM",
                 "gemma3_text": "SurgeonGemma3ForCausalLM", "opt": "SurgeonOPTForCausalLM"}


@pytest.mark.parametrize("label", list(ARCHITECTURES))
def test_vllm_matches_torch(label: str, models: dict[str, Path], served: dict[str, dict]) -> None:
    """Greedy tokens equal; log-probabilities and perplexity agree; the architecture is ours only where per-layer
    (per-layer Qwen2 with q/k/v biases and sliding windows on its later layers; Qwen3 with q/k norms; Gemma's scaled
    embeddings and 1 + w norms, Gemma2's soft-capping and alternating windows, Gemma3's two RoPE bases; OPT's learned
    positions, biases, LayerNorm and projections in and out, heads removed from a head_dim of hidden over heads)."""
    got = served[label]
    assert "error" not in got, got.get("error")
    ref = torch_reference(models[label])
    assert got["greedy"] == generate(ref, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens
    assert len({tuple(row) for row in got["greedy"]}) == len(PROMPTS)  # not a degenerate model: every row differs
    window, atol = torch.tensor([WINDOW]), TOLERANCE.get(label, ATOL)
    expected = torch.log_softmax(ref.logits(window)[0], dim=-1)  # [T, V]
    torch.testing.assert_close(torch.tensor(got["logprobs"]), expected, atol=atol, rtol=0)
    torch.testing.assert_close(torch.tensor(got["last_logprobs"]), expected[-1], atol=atol, rtol=0)
    own = expected[:-1].gather(-1, window[0, 1:, None])[:, 0]  # [T - 1]
    torch.testing.assert_close(torch.tensor(got["token_logprobs"], dtype=torch.float64), own.double(), atol=atol, rtol=0)
    want = perplexity(ref.model, torch.tensor(WINDOW * 3), seq_len=len(WINDOW), progress=False).perplexity
    assert got["perplexity"] == pytest.approx(want, rel=atol / 10)  # 1e-5 but for Gemma
    assert got["describe"]["vllm"]["architecture"] == ARCHITECTURES[label]
    assert got["describe"]["parameters"]["total"] == sum(p.numel() for p in ref.model.state_dict().values()) \
        - (ref.model.config.tie_word_embeddings * ref.model.lm_head.weight.numel())


def test_per_layer_shapes_reach_vllm(models: dict[str, Path], served: dict[str, dict]) -> None:
    """The per-layer checkpoint really has per-layer sizes, and vLLM's KV cache sizing counts them."""
    config = json.loads((models["per-layer"] / "config.json").read_text())
    assert list(zip(config["layer_intermediate_sizes"], config["layer_num_attention_heads"],
                    config["layer_num_key_value_heads"])) == list(PER_LAYER_SIZES)
    opt = json.loads((models["opt"] / "config.json").read_text())
    assert (opt["layer_intermediate_sizes"], opt["layer_num_attention_heads"], opt["head_dim"]) == ([35, 40, 31],
                                                                                                  [6, 5, 4], 32)
    assert json.loads((models["uniform"] / "config.json").read_text())["model_type"] == "llama"
    assert served["per-layer"]["describe"]["parameters"]["decoder_linear"] < served["dense"]["describe"]["parameters"]["decoder_linear"]


def test_sampling_is_seeded(served: dict[str, dict]) -> None:
    """vLLM's sampler: the same seed draws the same tokens, another seed others; every token in the vocabulary."""
    same, again, other = served["per-layer"]["sampled"]
    assert same == again and same != other
    assert all(0 <= t < 320 for row in same + other for t in row)


@pytest.fixture(scope="module")
def stock_nas(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A per-layer checkpoint, its Nemotron-NAS layout (tests/test_nemotron_nas.py's model at head_dim 32), and
    what stock vLLM gave for the latter (plugins off, isolated Python, one engine)."""
    per_layer_dir, nas = write_nas(tmp_path_factory.mktemp("vllm-nas"), make_tokenizer(vocab_size=320), **SHAPE)
    windows = eval_windows(torch.tensor(WINDOW * 3), len(WINDOW), None).tolist()
    got = vllm_parity.served_stock({"model": str(nas), "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "window": WINDOW,
                                    "full": True, "windows": windows, "threads": 1, "max_model_len": 128,
                                    "kv_cache_bytes": 64 * 2**20})
    return per_layer_dir, nas, got


def test_nemotron_nas_served_by_stock_vllm(stock_nas: tuple[Path, Path, dict]) -> None:
    """Per-layer MLP widths (one as ffn_mult), per-layer KV heads, a no_op MLP and a no_op attention: stock vLLM,
    with no plugin and no module of ours imported, gives torch's greedy tokens and log-probabilities."""
    per_layer_dir, nas, got = stock_nas
    assert json.loads((nas / "config.json").read_text())["block_configs"] == NAS_BLOCKS
    assert got["describe"]["ours_imported"] == [] and got["describe"]["vllm"]["plugins"] == ""
    assert got["describe"]["vllm"]["architecture"] == "DeciLMForCausalLM"
    assert got["describe"]["vllm"]["config_class"].startswith("transformers_modules.")  # the shipped file, run as remote code
    ref = torch_reference(per_layer_dir)
    assert got["greedy"] == generate(ref, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens
    assert len({tuple(row) for row in got["greedy"]}) == len(PROMPTS)
    window = torch.tensor([WINDOW])
    expected = torch.log_softmax(ref.logits(window)[0], dim=-1)  # [T, V]
    torch.testing.assert_close(torch.tensor(got["logprobs"]), expected, atol=ATOL, rtol=0)
    own = expected[:-1].gather(-1, window[0, 1:, None])[:, 0]  # [T - 1]
    torch.testing.assert_close(torch.tensor(got["token_logprobs"], dtype=torch.float64), own.double(), atol=ATOL, rtol=0)
    ids = torch.tensor(WINDOW * 3)
    windows = eval_windows(ids, len(WINDOW), None).tolist()
    want = perplexity(ref.model, ids, seq_len=len(WINDOW), progress=False).perplexity
    assert vllm_parity.stock_perplexity(got, ids, windows, len(WINDOW), None) == pytest.approx(want, rel=1e-5)


def test_generate_cli_runs_in_vllm_environment(models: dict[str, Path]) -> None:
    """``generate --backend vllm`` from this environment re-runs in vLLM's and gives torch's greedy tokens (in a new
    interpreter on purpose: the command replaces its process by one of vLLM's environment, ``exec``)."""
    run = run_cli_process("generate", str(models["per-layer"]), "--backend", "vllm", "-p", "hello world", "-p",
                          "the cat", "--max-new-tokens", "12", "--stop", "1", "--json", "--quiet",
                          env={**worker_env(), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    ref = torch_reference(models["per-layer"])
    ids = [ref.tokenizer(t)["input_ids"] for t in ("hello world", "the cat")]
    want = generate(ref, ids, GenerationConfig(max_new_tokens=12, stop_tokens=(1,), pad_token_id=1)).tokens
    assert [r["tokens"] for r in out["outputs"]] == want


def test_bench_runs_vllm_worker(models: dict[str, Path], tmp_path: Path) -> None:
    """``bench --backend vllm``: the worker runs in vLLM's environment; perplexity equals torch's (a new interpreter
    as for generate: the command replaces its process)."""
    out = tmp_path / "bench.json"
    run = run_cli_process("bench", str(models["per-layer"]), "--backend", "vllm", "--prefill", "1x16", "--decode", "2",
                          "--prompt-len", "8", "--new-tokens", "4", "--ppl-windows", "2", "--ppl-seq-len", "32",
                          "--out", str(out), "--quiet", "--threads", "1", "--device", "cpu",
                          env={**worker_env(), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    model = json.loads(out.read_text())["models"][0]
    assert model["artefact"]["vllm"]["architecture"] == "SurgeonLlamaForCausalLM"
    assert [c["status"] for c in model["prefill"] + model["decode"]] == ["ok", "ok"]
    assert model["decode"][0]["tokens_per_s"]["median"] > 0
    ref = torch_reference(models["per-layer"])
    from base.data import eval_tokens

    ids = eval_tokens(ref.tokenizer, None, None).ids
    want = perplexity(ref.model, ids, seq_len=32, max_windows=2, progress=False).perplexity
    assert model["perplexity"]["perplexity"] == pytest.approx(want, rel=1e-5)


def test_environment_pins_and_missing_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's environment: the project's pins but transformers and numpy, vLLM as pyproject's extra pins it;
    a missing environment is one line naming the command that makes it."""
    import tomllib

    from base.errors import SurgeonError
    from runtime import vllm_env

    ours = (vllm_env.REPO / "constraints.txt").read_text().splitlines()
    theirs = vllm_env.constraints(vllm_env.REPO / "constraints.txt").splitlines()
    changed = {a: b for a, b in zip(ours, theirs) if a != b}
    assert changed == {"transformers==5.23.0": "transformers==5.19.0", "numpy==2.4.6": "numpy==2.3.5"}
    assert theirs[len(ours):] == [vllm_env.VLLM_PACKAGE]
    extras = tomllib.loads((vllm_env.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [vllm_env.VLLM_PACKAGE]
    monkeypatch.setenv(vllm_env.ENV_VARIABLE, str(tmp_path / "none"))
    with pytest.raises(SurgeonError, match="surgeon-export vllm-setup"):
        backend_python("vllm")
    assert backend_python("torch") is None
