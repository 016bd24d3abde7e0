"""``onnx --uniform-cache``: per-layer-shape exports with one KV-head count at the graph boundary.

The padding (zeros after each layer's own KV heads) must not change any output: it is sliced off
before attention, so even garbage there gives bit-identical logits, and the padded part of every
present is exactly zero. The config beside the graph is the stock family's with matching global
counts, which is what optimum's ``ORTModelForCausalLM`` sizes its cache from (the check with
optimum itself needs transformers<4.58: benchmarks/results/optimum_check.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from base.formats import MODELING_FILE, ONNX_FILE, ONNX_MANIFEST_FILE
from runtime.backend import load_backend
from runtime.generate import GenerationConfig, generate
from tests.conftest import cached_logits as _logits
from tests.test_onnx_export import _export_dir

FAMILIES = ("llama", "opt")  # grouped KV heads, and one KV head per query head


@pytest.fixture(scope="module")
def uniform(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("uniform")
    return {family: _export_dir(root, family, "per-layer", uniform_cache=True) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_boundary_and_config_are_uniform(family: str, uniform: dict) -> None:
    checkpoint, out = uniform[family]
    source = json.loads((checkpoint / "config.json").read_text())
    own = source["layer_num_key_value_heads"] if family == "llama" else source["layer_num_attention_heads"]
    assert len(set(own)) > 1  # the layers really differ
    heads = max(own) if family == "llama" else source["num_attention_heads"]
    graph = onnx.load(str(out / ONNX_FILE), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    cache = [name for name in dims if name.startswith(("past_key_values.", "present."))]
    assert len(cache) == 4 * len(own) and all(dims[name][1] == heads for name in cache)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and not (out / MODELING_FILE).exists()
    assert config["architectures"] == [source["architectures"][0].removeprefix("Surgeon")]
    if family == "llama":
        assert config["num_key_value_heads"] == heads
    assert config["num_attention_heads"] == source["num_attention_heads"]
    assert config["hidden_size"] // config["num_attention_heads"] == dims[cache[0]][3]  # optimum's head size
    for key in ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads"):
        assert config[key] == source[key], key  # per-layer facts stay readable (FLOPs, describe)
    manifest = json.loads((out / ONNX_MANIFEST_FILE).read_text())
    assert manifest["graph"]["cache_kv_heads"] == heads and manifest["config"]["uniform_cache"]
    assert manifest["verification"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_cannot_change_outputs(family: str, uniform: dict) -> None:
    """Garbage in the padded heads of the past: bit-identical logits; padded presents exactly zero."""
    checkpoint, out = uniform[family]
    source = json.loads((checkpoint / "config.json").read_text())
    own = source["layer_num_key_value_heads"] if family == "llama" else source["layer_num_attention_heads"]
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.array([[3, 14, 15, 9, 2], [6, 5, 3, 5, 8]], dtype=np.int64)
    shape = session.get_inputs()[3].shape  # [batch, heads, past, head_dim], the same for every layer
    empty = {name: np.zeros((2, shape[1], 0, shape[3]), np.float32) for name in names}
    first = session.run(None, {"input_ids": ids[:, :3], "attention_mask": np.ones((2, 3), np.int64),
                               "position_ids": np.arange(3)[None].repeat(2, 0), **empty})
    for i, present in enumerate(first[1:]):
        assert not present[:, own[i // 2]:].any()  # zeros after the layer's own heads
        assert present[:, :own[i // 2]].any()
    step = {"input_ids": ids[:, 3:], "attention_mask": np.ones((2, 5), np.int64), "position_ids": np.arange(3, 5)[None].repeat(2, 0)}
    clean = session.run(None, {**step, **dict(zip(names, first[1:]))})
    rng = np.random.default_rng(0)
    dirty = []
    for i, present in enumerate(first[1:]):
        noisy = present.copy()
        noisy[:, own[i // 2]:] = rng.normal(size=noisy[:, own[i // 2]:].shape) * 1e3
        dirty.append(noisy)
    noisy_out = session.run(None, {**step, **dict(zip(names, dirty))})
    assert np.array_equal(noisy_out[0], clean[0])  # logits: bit-identical
    for i, (a, b) in enumerate(zip(clean[1:], noisy_out[1:])):
        assert np.array_equal(a, b) and not a[:, own[i // 2]:].any()


@pytest.mark.parametrize("backend", ("onnxruntime", "openvino"))
@pytest.mark.parametrize("family", FAMILIES)
def test_runtimes_match_torch(family: str, backend: str, uniform: dict) -> None:
    checkpoint, out = uniform[family]
    torch_dec, dec = load_backend("torch", checkpoint), load_backend(backend, out, threads=1)
    ids = torch.randint(0, 90, (2, 17), generator=torch.Generator().manual_seed(1))
    for chunks in ([ids], [ids[:, :9], ids[:, 9:10], ids[:, 10:13], ids[:, 13:]]):
        want, got = _logits(torch_dec, chunks), _logits(dec, chunks)
        assert float((got - want).abs().max()) <= 1e-4 * max(float(want.abs().max()), 1.0)
    prompts = [[5, 9, 14, 2, 33, 8, 70], [11, 3]]
    cfg = GenerationConfig(max_new_tokens=16)
    assert generate(dec, prompts, cfg).tokens == generate(torch_dec, prompts, cfg).tokens
    assert dec.describe()["flops_per_token"] == torch_dec.describe()["flops_per_token"]  # per-layer config kept
