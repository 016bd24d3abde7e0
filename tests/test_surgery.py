"""Structured removal: the surgery seam, zero-group detection, aligned and uniform plans, FLOPs.

The central check (STYLE.md section 5): on tiny random models of every family, in float64, the
shrunk model's logits equal the masked (zeroed) model's logits, for random plans that use grouped-
query attention and leave the layers with different sizes.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from base.adapters import GEMMA, LLAMA, OPT, find_model_type, get_adapter, gguf_architectures, supported_model_types
from base.errors import SurgeonError
from base.surgery import (
    LayerCosts,
    LayerPlan,
    LayerShape,
    RemovalPlan,
    drop_cols_,
    drop_rows_,
    layer_shapes,
    resolve,
    shrink_,
    zero_groups_,
)
from export.compress import find_zero_groups
from export.flops import matmul_flops_per_token
from export.shapes import align_plan, magnitude_costs, stock_config, uniform_plan
from tests.families import FAMILIES, make_model  # noqa: F401  (other test files import them from here too)

IDS = torch.tensor([[0, 5, 9, 17, 3, 8, 2, 11, 4], [7, 1, 2, 3, 60, 12, 9, 9, 30]])


def random_plan(shapes: list[LayerShape], seed: int) -> RemovalPlan:
    """Different sizes per layer: some channels everywhere; whole KV groups, query heads, or both."""
    rng = random.Random(seed)
    plan = RemovalPlan()
    for i, s in enumerate(shapes):
        channels = rng.sample(range(s.intermediate_size), k=min(s.intermediate_size - 1, 3 + 7 * i + rng.randrange(4)))
        group = s.num_attention_heads // s.num_key_value_heads
        kv: list[int] = []
        heads: list[int] = []
        if group == 1:  # no GQA: heads are removed whole
            heads = rng.sample(range(s.num_attention_heads), k=1 + i % (s.num_attention_heads - 1))
        else:
            if i % 3 != 1 and s.num_key_value_heads > 1:
                kv = rng.sample(range(s.num_key_value_heads), k=1)
            if i % 3 != 0:
                per_group = 1 + rng.randrange(group - 1)
                heads = [g * group + j for g in range(s.num_key_value_heads) for j in rng.sample(range(group), per_group)]
        plan.layers[i] = LayerPlan.of(channels, heads, kv)
    return plan


def test_drop_rows_and_cols_known_answer() -> None:
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).reshape(4, 3))
        lin.bias.copy_(torch.tensor([10.0, 11.0, 12.0, 13.0]))
    drop_rows_(lin, [1, 3])
    assert lin.weight.tolist() == [[0, 1, 2], [6, 7, 8]] and lin.bias.tolist() == [10, 12]
    assert (lin.out_features, lin.in_features) == (2, 3)
    drop_cols_(lin, torch.tensor([0]))
    assert lin.weight.tolist() == [[1, 2], [7, 8]] and lin.bias.tolist() == [10, 12]
    assert (lin.out_features, lin.in_features) == (2, 2)
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad


def test_resolve_coupling_rules() -> None:
    shape = LayerShape(intermediate_size=10, num_attention_heads=6, num_key_value_heads=2)
    kept = resolve(shape, LayerPlan.of(channels=[0, 9], kv_groups=[0]))
    assert kept.shape == LayerShape(8, 3, 1) and kept.heads.tolist() == [3, 4, 5]
    kept = resolve(shape, LayerPlan.of(heads=[0, 5]))  # one query head from each group
    assert kept.shape == LayerShape(10, 4, 2) and kept.heads.tolist() == [1, 2, 3, 4]
    with pytest.raises(SurgeonError, match="removed evenly from every kept KV group .*kept per group: \\[2, 3\\]"):
        resolve(shape, LayerPlan.of(heads=[0]))
    with pytest.raises(SurgeonError, match="layer 4: query head 6 out of range"):
        resolve(shape, LayerPlan.of(heads=[6]), index=4)
    with pytest.raises(SurgeonError, match="removes all 10 MLP channels"):
        resolve(shape, LayerPlan.of(channels=range(10)))
    with pytest.raises(SurgeonError, match="removes every attention head"):
        resolve(shape, LayerPlan.of(kv_groups=[0, 1]))
    with pytest.raises(SurgeonError, match="removed evenly"):
        resolve(shape, LayerPlan.of(heads=[0, 1, 2, 3, 4, 5]))
    mha = LayerShape(10, 4, 4)  # without GQA a query head takes its key/value head along
    assert resolve(mha, LayerPlan.of(heads=[1])).shape == LayerShape(10, 3, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_logits_equal_masked_logits(family: str) -> None:
    model = make_model(family)
    adapter = get_adapter(model.config.model_type)
    with torch.no_grad():
        original = model(IDS).logits
    for seed in range(2):
        masked = make_model(family)
        plan = random_plan(layer_shapes(masked, adapter), seed)
        zero_groups_(masked, adapter, plan)
        with torch.no_grad():
            reference = masked(IDS).logits
        assert (reference - original).abs().max() > 1e-3  # the masks did change the model
        manifest = shrink_(masked, adapter, plan)
        with torch.no_grad():
            shrunk = masked(IDS).logits
        torch.testing.assert_close(shrunk, reference, rtol=0, atol=1e-10)
        sizes = [s.intermediate_size for s in manifest.after]
        assert len(set(sizes)) == len(sizes)  # every layer ends up with its own width
        assert manifest.after == layer_shapes(masked, adapter)
        assert masked.config.layer_intermediate_sizes == sizes
        assert masked.config.layer_num_attention_heads == [s.num_attention_heads for s in manifest.after]
        for layer, shape in zip(adapter.decoder_layers(masked), manifest.after):
            attn = adapter.attention(layer)
            if adapter.kv_groups_attr:
                assert getattr(attn, adapter.kv_groups_attr) == shape.num_attention_heads // shape.num_key_value_heads
            if adapter.heads_attr:
                assert getattr(attn, adapter.heads_attr) == shape.num_attention_heads


def test_shrink_float32_and_generate_with_cache() -> None:
    masked = make_model("llama", dtype=torch.float32)
    plan = random_plan(layer_shapes(masked, LLAMA), seed=3)
    zero_groups_(masked, LLAMA, plan)
    with torch.no_grad():
        reference = masked(IDS).logits
        expected = masked.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    shrink_(masked, LLAMA, plan)
    with torch.no_grad():
        torch.testing.assert_close(masked(IDS).logits, reference, rtol=0, atol=1e-5)
        assert torch.equal(masked.generate(IDS[:1], max_new_tokens=4, do_sample=False), expected)


def test_shrink_checks_every_layer_before_changing_any() -> None:
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = RemovalPlan({0: LayerPlan.of(channels=[1, 2]), 2: LayerPlan.of(heads=[0])})
    with pytest.raises(SurgeonError, match="layer 2: query heads must be removed evenly"):
        shrink_(model, LLAMA, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SurgeonError, match="plan names layer 7, but the model has 3 layers"):
        shrink_(model, LLAMA, RemovalPlan({7: LayerPlan.of(channels=[0])}))


@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma3_text", "opt"))
def test_find_zero_groups_recovers_the_plan(family: str) -> None:
    masked = make_model(family)
    adapter = get_adapter(masked.config.model_type)
    shapes = layer_shapes(masked, adapter)
    plan = random_plan(shapes, seed=1)
    zero_groups_(masked, adapter, plan)
    found = find_zero_groups(masked, adapter)
    expected = [resolve(s, plan.get(i), i).shape for i, s in enumerate(shapes)]
    for i in range(len(shapes)):
        assert found.get(i).channels == plan.get(i).channels
        assert resolve(shapes[i], found.get(i), i).shape == expected[i]
    with torch.no_grad():
        reference = masked(IDS).logits
    assert shrink_(masked, adapter, found).after == expected
    with torch.no_grad():
        torch.testing.assert_close(masked(IDS).logits, reference, rtol=0, atol=1e-10)
    assert find_zero_groups(masked, adapter).layers == {}


def test_find_zero_groups_keeps_groups_even_and_floors() -> None:
    model = make_model("llama")
    hd = 8
    with torch.no_grad():
        o = model.model.layers[0].self_attn.o_proj.weight
        o[:, 0 * hd:1 * hd] = 0  # group 0: heads 0, 1 zero; group 1: head 3 zero
        o[:, 1 * hd:2 * hd] = 0
        o[:, 3 * hd:4 * hd] = 0
        model.model.layers[1].mlp.down_proj.weight.zero_()  # every channel zero: one must stay
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # every head zero: one group, one head stays
        model.model.layers[2].mlp.up_proj.weight[5].zero_()  # a zero row in only one of gate/up: not enough
        reference = model(IDS).logits
    plan = find_zero_groups(model, LLAMA)
    assert plan.get(0) == LayerPlan.of(heads=[0, 3])  # one zero head per group; head 1 stays as zeros
    assert len(plan.get(1).channels) == 39
    assert plan.get(2).channels == () and plan.get(2).kv_groups == (1,) and len(plan.get(2).heads) == 2
    shapes = shrink_(model, LLAMA, plan).after
    assert [s.num_attention_heads for s in shapes] == [4, 6, 1] and shapes[1].intermediate_size == 1
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rounding", ["up", "down", "nearest"])
def test_align_rounds_every_kept_size(rounding: str) -> None:
    masked = make_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=4, intermediate_size=64)
    shapes = layer_shapes(masked, LLAMA)
    plan = RemovalPlan({i: LayerPlan.of(channels=range(3 + 11 * i), kv_groups=[i % 4]) for i in range(3)})
    zero_groups_(masked, LLAMA, plan)
    with torch.no_grad():
        reference = masked(IDS).logits
    aligned = align_plan(masked, LLAMA, plan, 16, rounding=rounding)  # type: ignore[arg-type]
    after = shrink_(masked, LLAMA, aligned).after
    for s, before in zip(after, shapes):
        assert s.intermediate_size % 16 == 0 and (s.num_attention_heads * 4) % 16 == 0
        assert (s.num_key_value_heads * 4) % 16 == 0 and s.intermediate_size <= before.intermediate_size
    kept = [len(range(3 + 11 * i, 64)) for i in range(3)]  # 61, 50, 39
    expected = {"up": [64, 64, 48], "down": [48, 48, 32], "nearest": [64, 48, 32]}[rounding]
    assert [s.intermediate_size for s in after] == expected, kept
    if rounding == "up":  # only zeroed groups came back: outputs unchanged
        with torch.no_grad():
            torch.testing.assert_close(masked(IDS).logits, reference, rtol=0, atol=1e-10)


def test_align_brings_back_the_costliest_groups_first() -> None:
    model = make_model("llama")
    shape = layer_shapes(model, LLAMA)[0]
    cost = torch.arange(shape.intermediate_size, dtype=torch.float64)
    costs = magnitude_costs(model, LLAMA)
    costs[0] = LayerCosts(cost, costs[0].heads, costs[0].kv_groups)
    plan = RemovalPlan({0: LayerPlan.of(channels=range(0, 40, 2))})  # keeps 20 odd channels
    aligned = align_plan(model, LLAMA, plan, 8, costs=costs, rounding="up")
    assert aligned.get(0).channels == tuple(range(0, 32, 2))  # 32..38 (costliest) came back: 24 kept
    aligned = align_plan(model, LLAMA, plan, 8, costs=costs, rounding="down")
    assert aligned.get(0).channels == tuple(sorted(set(range(0, 40, 2)) | {1, 3, 5, 7}))


def test_align_errors() -> None:
    model = make_model("llama")
    with pytest.raises(SurgeonError, match="--align 64: layer 0 has only 40 MLP channels"):
        align_plan(model, LLAMA, RemovalPlan(), 64)
    with pytest.raises(SurgeonError, match="--align must be at least 1"):
        align_plan(model, LLAMA, RemovalPlan(), 0)


@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma3_text", "opt"))
def test_uniform_plan_gives_every_layer_the_same_stock_sizes(family: str) -> None:
    masked = make_model(family)
    adapter = get_adapter(masked.config.model_type)
    plan = random_plan(layer_shapes(masked, adapter), seed=0)
    zero_groups_(masked, adapter, plan)
    with torch.no_grad():
        reference = masked(IDS).logits
    after = shrink_(masked, adapter, uniform_plan(masked, adapter, plan)).after
    assert len(set(after)) == 1
    kept = [resolve(s, plan.get(i), i).shape for i, s in enumerate(layer_shapes(make_model(family), adapter))]
    assert after[0].intermediate_size == max(k.intermediate_size for k in kept)
    if adapter.head_dim_derived:  # stock OPT computes head_dim from the head count: all heads stay
        assert after[0].num_attention_heads == 6
    stock_config(masked.config, adapter, after[0], adapter.head_dim(masked.config))
    with torch.no_grad():
        torch.testing.assert_close(masked(IDS).logits, reference, rtol=0, atol=1e-10)


def test_uniform_plan_respects_stock_validation() -> None:
    # Llama's config requires the heads to divide hidden_size (48): 5 heads are invalid, 6 are not.
    model = make_model("llama", num_key_value_heads=6)  # 6 KV heads of 1 query head each
    plan = RemovalPlan({i: LayerPlan.of(heads=[i]) for i in range(3)})  # 5 heads everywhere
    assert uniform_plan(model, LLAMA, plan).layers == {}  # 5 does not divide 48: all 6 come back
    plan = RemovalPlan({i: LayerPlan.of(heads=[0, 1] if i else [0, 1, 2]) for i in range(3)})  # 3, 4, 4 heads
    after = shrink_(model, LLAMA, uniform_plan(model, LLAMA, plan)).after
    assert {s.num_attention_heads for s in after} == {4}


def test_adapters_describe_each_family() -> None:
    assert LLAMA.linear_names == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    assert LLAMA.input_groups[2] == ("mlp.gate_proj", "mlp.up_proj")
    assert GEMMA.linear_names == LLAMA.linear_names
    assert OPT.linear_names == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
    )
    assert OPT.input_groups == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",),
    )
    assert OPT.channel_rows == ("fc1",) and OPT.channel_cols == ("fc2",)
    model = make_model("opt")
    linears = OPT.decoder_linears(model)
    assert len(linears) == 3 * 6 and "model.decoder.layers.2.fc1" in linears
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "surgeon_llama"):
        assert get_adapter(model_type) is LLAMA
    for model_type in ("gemma", "gemma2", "gemma3_text", "surgeon_gemma3_text"):
        assert get_adapter(model_type) is GEMMA
    assert get_adapter("surgeon_opt") is OPT
    with pytest.raises(SurgeonError, match="unsupported architecture 'gpt2'; supported: llama, .*gemma.*, opt"):
        get_adapter("gpt2")
    assert supported_model_types()[0] == "llama"


def test_adapters_name_their_per_layer_classes_and_quirks() -> None:
    """Each stock model type's per-layer classes (base/modeling.py) extend its stock ones with the adapter's
    layout, and every per-layer class belongs to exactly one model type."""
    from transformers import AutoConfig

    from base import modeling

    named = []
    for adapter in (LLAMA, GEMMA, OPT):
        for model_type in adapter.model_types:
            config_cls, model_cls = adapter.per_layer_classes(model_type)
            assert adapter.per_layer_classes(f"surgeon_{model_type}") == (config_cls, model_cls)
            assert config_cls.model_type == modeling.MODEL_TYPE_PREFIX + model_type and model_cls.config_class is config_cls
            assert issubclass(config_cls, type(AutoConfig.for_model(model_type)))
            assert (config_cls.intermediate_key, config_cls.grouped_kv) == (adapter.intermediate_key, adapter.grouped_kv)
            assert model_cls.layers_path == adapter.layers
            named.append(model_cls)
    assert sorted(named, key=str) == sorted(modeling.PER_LAYER_MODELS, key=str) and len(set(named)) == len(named)
    with pytest.raises(SurgeonError, match="'opt' is not of the llama family"):
        LLAMA.per_layer_classes("opt")
    assert (LLAMA.norm_offset, GEMMA.norm_offset, OPT.norm_offset) == (0.0, 1.0, 0.0)  # Gemma: x * (1 + w)
    assert [t.name for t in GEMMA.types if t.rope_local_base_key] == ["gemma3_text"]
    assert find_model_type("surgeon_gemma3_text") is GEMMA.model_type("gemma3_text") and find_model_type("gpt2") is None
    assert [t.name for t in LLAMA.types if t.gguf is not None and t.gguf.square_q] == ["qwen2"]
    assert OPT.gguf_arch("opt") is None and set(gguf_architectures()) == {
        "llama", "deci", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_shapes_agree_with_the_linears(family: str) -> None:
    """The one reader of per-layer sizes gives what the linears hold: stock configs, a shrunk model's config,
    and the per-layer config written for it (object and config.json dict)."""
    from export.pruned import per_layer_config

    model = make_model(family)
    adapter = get_adapter(family)
    kv = 6 if family == "opt" else 2  # OPT: one key/value head per query head
    assert adapter.config_shapes(model.config) == [LayerShape(40, 6, kv)] * 3 == layer_shapes(model, adapter)
    shrink_(model, adapter, random_plan(layer_shapes(model, adapter), seed=3))
    shapes = layer_shapes(model, adapter)
    assert len(set(shapes)) > 1
    assert adapter.config_shapes(model.config) == shapes
    config = per_layer_config(model, adapter)
    assert adapter.config_shapes(config) == shapes == adapter.config_shapes(config.to_dict())


def test_config_shapes_name_a_bad_field() -> None:
    stock = {"num_hidden_layers": 3, "intermediate_size": 40, "num_attention_heads": 6, "num_key_value_heads": 2}
    assert LLAMA.config_shapes(stock) == [LayerShape(40, 6, 2)] * 3
    assert OPT.config_shapes({**stock, "ffn_dim": 8}) == [LayerShape(8, 6, 6)] * 3
    for changes, message in (
        ({"intermediate_size": None}, "config field intermediate_size must be a positive integer, got None"),
        ({"num_hidden_layers": 0}, "config field num_hidden_layers must be a positive integer, got 0"),
        ({"layer_intermediate_sizes": [4, 4]}, r"layer_intermediate_sizes must be a list of 3 sizes"),
        ({"layer_num_attention_heads": [6, True, 6]}, "layer_num_attention_heads must hold positive integers"),
        ({"layer_num_key_value_heads": [2, 4, 2]}, "config layer 1: 6 query heads cannot be grouped over 4"),
    ):
        with pytest.raises(SurgeonError, match=message):
            LLAMA.config_shapes({**stock, **changes})
    with pytest.raises(SurgeonError, match="config layer 0: 6 query heads cannot be grouped over 2"):
        OPT.config_shapes({**stock, "ffn_dim": 8, "layer_num_key_value_heads": [2, 2, 2]})


def test_flops_count_shrunk_layers() -> None:
    model = make_model("llama")
    full = matmul_flops_per_token(model.config, seq_len=9)
    hidden, hd, vocab = 48, 8, 96
    per_layer = 2 * hidden * hd * (6 + 2 + 2 + 6) + 2 * hidden * 40 * 3
    assert full["linears"] == 3 * per_layer
    assert full["attention"] == 3 * 4 * 6 * hd * 5  # mean causal context of 9 tokens: 5 keys
    assert full["lm_head"] == 2 * hidden * vocab
    shrink_(model, LLAMA, RemovalPlan({0: LayerPlan.of(channels=range(10), kv_groups=[1])}))
    small = matmul_flops_per_token(model.config, seq_len=9)
    assert full["linears"] - small["linears"] == 2 * hidden * hd * (3 + 1 + 1 + 3) + 2 * hidden * 10 * 3
    assert full["attention"] - small["attention"] == 4 * 3 * hd * 5
    opt = matmul_flops_per_token(make_model("opt").config, seq_len=9)
    assert opt["linears"] == 3 * (2 * hidden * hd * 24 + 2 * hidden * 40 * 2)
    gemma3 = matmul_flops_per_token(make_model("gemma3_text").config, seq_len=9)
    assert gemma3["attention"] < full["attention"]  # sliding layers see at most 4 keys
