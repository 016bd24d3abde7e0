"""memory_plan's streamed estimate, term by term (issue #29): the process, the tokenizer, the float32 tensors
outside the layers (the embeddings, LLM Surgeon's LM head), the layer boundary, the layer step, and their
peak as docs/streaming.md writes it, on the tiny model of every family and on Gemma3-270m's shapes built on
the meta device. The estimates against measured peaks: benchmarks/results/memory_plan.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from base.adapters import get_adapter
from base.lazy import LazyModel, LazyWeights, open_lazy
from benchmarks.streaming import gemma3_270m_config
from surgeon.calibrate import HEAD_CHUNK
from surgeon.sds import SDSConfig
from surgeon_export import api
from tests.families import FAMILIES, save_family

WANDA = api.build_config("wanda", sparsity=0.5)
SURGEON = api.build_config("surgeon", structured=0.8, shots=2, kfac_batch=1, calib_samples=8)


def peak(terms: dict[str, int], surgeon: bool) -> int:
    """The formula of memory_plan's docstring, from its terms."""
    t = terms
    if surgeon:
        step = t["boundary"] + t["layer"] + t["statistics"] + t["activations"] + t["head"]
        return t["process"] + t["tokenizer"] + max(t["outside"] + max(t["reading"], step), t["writing"])
    step = t["layer"] + t["statistics"] + t["activations"] + t["boundary"]
    return t["process"] + t["tokenizer"] + max(t["outside"] + max(t["reading"], t["boundary"]), step, t["writing"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_counts_its_embeddings_head_and_boundary(family: str, tmp_path: Path) -> None:
    src = save_family(family, tmp_path / family)
    for cfg in (WANDA, SURGEON):
        surgeon = api.needs_head(cfg)
        lazy = open_lazy(src, head=surgeon)
        model = lazy.model
        H, V = model.config.hidden_size, model.config.vocab_size
        outside = {n: p for n, p in model.named_parameters() if not n.startswith(lazy.adapter.layers + ".")}
        tied = model.config.tie_word_embeddings
        head = 0 if tied else model.get_output_embeddings().weight.numel()
        assert head == (0 if family != "mistral" else V * H)  # the tiny mistral's head is untied
        expected = 4 * (sum(p.numel() for p in outside.values()) - (0 if surgeon else head))
        assert expected >= 4 * V * H  # the embeddings at least
        plan = api.memory_plan(lazy, cfg, 8, 32, streaming=True)
        t = plan.terms
        assert t["outside"] == plan.outside == expected
        assert t["tokenizer"] == api.TOKENIZER_BYTES * V and t["process"] == api.PROCESS_BYTES
        assert t["reading"] == 4 * max(p.numel() for n, p in outside.items() if surgeon or tied or "lm_head" not in n)
        assert t["writing"] == 2 * 4 * sum(p.numel() for p in outside.values())  # float32 sources
        assert t["boundary"] == (2 if surgeon else 1) * 4 * 8 * 32 * H
        if surgeon:
            assert t["head"] == 4 * 4 * min(HEAD_CHUNK, 1 * 32 * V)  # one K-FAC batch of logits at most
        assert plan.streamed == peak(t, surgeon)


def gemma3_270m_lazy() -> LazyModel:
    """Gemma3-270m's shapes on the meta device, its embedding stored in bfloat16 as in the real checkpoint."""
    config = gemma3_270m_config()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = LazyWeights([])
    weights.dtypes = {"model.embed_tokens.weight": "BF16"}  # the real checkpoint's dtype
    return LazyModel(model, None, get_adapter(config.model_type), Path("."), "meta", weights, torch.float32)


# One Gemma3-270m decoder layer's float32 weights: q, k + v, o, gate + up + down, q/k norms, 4 layer norms.
GEMMA3_LAYER = 4 * (1024 * 640 + 2 * 256 * 640 + 640 * 1024 + 3 * 2048 * 640 + 2 * 256 + 4 * 640)


def test_gemma3_270m_shapes_on_the_meta_device() -> None:
    """Issue #29's model and command (8 x 512, K-FAC batch 1): what the old estimate left out (the process,
    a 262k tokenizer, the reading of the bfloat16 embedding) is counted, and the embedding once (tied)."""
    lazy = gemma3_270m_lazy()
    V, H, T, N = 262144, 640, 512, 8
    plan = api.memory_plan(lazy, SURGEON, N, T, streaming=True)
    t = plan.terms
    assert t["outside"] == 4 * (V * H + H)  # the embedding (the LM head is the same tensor) and the final norm
    assert t["reading"] == 2 * V * H and t["writing"] == 2 * 2 * (V * H + H)
    assert t["tokenizer"] == 1024 * V
    assert t["boundary"] == 2 * 4 * N * T * H
    A = 1024**2 + 2048**2  # o's and down's inputs: structured output-side costs use only those linears
    G = 640**2 + 640**2  # o, down
    assert t["statistics"] == 3 * 8 * (A + G)
    every = api.memory_plan(lazy, api.build_config("surgeon", pattern="2:4"), N, T, streaming=True).terms["statistics"]
    A = 2 * 640**2 + 1024**2 + 2048**2  # q/k/v and gate/up share their inputs; o; down
    G = 1024**2 + 2 * 256**2 + 640**2 + 2 * 2048**2 + 640**2  # q, k, v, o, gate, up, down
    assert every == 3 * 8 * (A + G)  # unstructured and N:M: every linear's factors
    assert t["activations"] == 4 * 1 * T * (8 * H + 4 * 2048 + 2 * 4 * T)
    assert t["layer"] == 2 * GEMMA3_LAYER
    assert plan.streamed == peak(t, True)
    assert t["head"] == 4 * 4 * HEAD_CHUNK  # 32 tokens of 262k logits a chunk
    assert plan.streamed == 2**20 * 500 + 1024 * V + t["outside"] + max(t["reading"], t["boundary"] + t["layer"] + t["statistics"] + t["activations"] + t["head"])
    wanda = api.memory_plan(lazy, WANDA, N, T, streaming=True)
    assert wanda.terms["outside"] == t["outside"] and wanda.streamed == peak(wanda.terms, False)


@pytest.mark.parametrize("method, kwargs, layers, statistics", [
    ("magnitude", dict(sparsity=0.5), 2, 0),
    ("wanda", dict(sparsity=0.5), 2, 8 * (640 + 1024 + 640 + 2048)),  # diag(A) of each input group
    ("sparsegpt", dict(pattern="2:4"), 2, 8 * (2 * 640**2 + 1024**2 + 2048**2 + 2 * 2048**2)),
    ("wanda", dict(sparsity=0.5, refine=SDSConfig()), 3, 8 * (2 * 640**2 + 1024**2 + 2048**2 + 2 * 2048**2)),
])
def test_layer_wise_step_as_docs_streaming_md_writes_it(method: str, kwargs: dict, layers: int,
                                                         statistics: int) -> None:
    """The layer-wise methods' step on Gemma3-270m's shapes, term by term as docs/streaming.md's formula:
    ``layer`` 2 L (3 L with SDS), ``statistics`` (magnitude none, Wanda ``8 Σ d_in``, SparseGPT and SDS
    ``8 (Σ d_in² + 2 d_max²)``), ``activations`` ``4 b T (4 H + 3 I)``, ``boundary`` ``4 N T H`` (x2 with SDS)."""
    V, H, I, T, N = 262144, 640, 2048, 512, 16
    cfg = api.build_config(method, **kwargs)
    plan = api.memory_plan(gemma3_270m_lazy(), cfg, N, T, streaming=True)
    t = plan.terms
    sds = 2 if "refine" in kwargs else 1
    assert t["layer"] == layers * GEMMA3_LAYER and t["statistics"] == statistics
    assert t["activations"] == 4 * 8 * T * (4 * H + 3 * I)  # a batch of 8 of the 16 windows
    assert t["boundary"] == sds * 4 * N * T * H
    assert t["outside"] == 4 * (V * H + H) and "head" not in t
    assert plan.streamed == t["process"] + t["tokenizer"] + max(
        t["outside"] + max(t["reading"], t["boundary"]),
        t["layer"] + t["statistics"] + t["activations"] + t["boundary"], t["writing"])
