"""Structured LLM Surgeon: coupled groups are removed whole, GQA groups stay equal, targets are met."""

from __future__ import annotations

import pytest
import torch

from base.adapters import LLAMA, get_adapter
from base.errors import SurgeonError
from base.patterns import NMPattern
from base.surgery import RemovalPlan, head_rows, shrink_
from export.compress import find_zero_groups
from surgeon.llm_surgeon import SurgeonConfig, prune_surgeon_
from surgeon.sds import SDSConfig
from surgeon.structures import Candidate, select
from tests.conftest import make_tiny_llama
from tests.test_surgery import FAMILIES, make_model


def calib(model) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))


def structure_state(model):
    """Per layer: removed MLP channels (checked coupled) and removed query heads (checked whole)."""
    head_dim = model.config.head_dim
    out = []
    for layer in model.model.layers:
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        ch = (gate == 0).all(1)
        assert torch.equal(ch, (up == 0).all(1)) and torch.equal(ch, (down == 0).all(0))
        q, o = layer.self_attn.q_proj.weight, layer.self_attn.o_proj.weight
        q_heads = (q == 0).reshape(-1, head_dim, q.shape[1]).flatten(1).all(1)
        o_heads = (o == 0).reshape(o.shape[0], -1, head_dim).permute(1, 0, 2).flatten(1).all(1)
        assert torch.equal(q_heads, o_heads)
        # nothing partially removed: a head's rows are all zero or none is
        assert not ((q == 0).all(1).reshape(-1, head_dim).any(1) & ~q_heads).any()
        assert (layer.self_attn.k_proj.weight != 0).any(1).all()  # KV heads are kept
        out.append((ch, q_heads))
    return out


@pytest.mark.parametrize("scoring", ["surgeon", "magnitude", "wanda"])
@pytest.mark.parametrize("remaining", [0.8, 0.6])
def test_structured_removes_coupled_groups_and_meets_target(remaining: float, scoring: str) -> None:
    model, _ = make_tiny_llama()
    total = sum(m.weight.numel() for m in LLAMA.decoder_linears(model).values())
    cfg = SurgeonConfig(structured=remaining, shots=2, scoring=scoring)  # type: ignore[arg-type]
    report = prune_surgeon_(model, LLAMA, calib(model), cfg, progress=False)
    state = structure_state(model)
    n_kv, group = model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads
    removed = 0
    for ch, heads in state:
        per_group = heads.reshape(n_kv, group).sum(1)
        assert (per_group == per_group[0]).all()  # equal group sizes for GQA kernels
        assert (per_group < group).all()  # at least one query head per group
        assert int((~ch).sum()) >= 1
        removed += int(ch.sum()) * 3 * 32 + int(heads.sum()) * 2 * model.config.head_dim * 32
    assert removed >= (1 - remaining) * total
    assert report.sparsity == pytest.approx(removed / total, abs=1e-3)  # every zero is a removed group


def test_structured_then_two_four() -> None:
    model, _ = make_tiny_llama()
    cfg = SurgeonConfig(structured=0.8, pattern=NMPattern(2, 4), shots=1)
    report = prune_surgeon_(model, LLAMA, calib(model), cfg, progress=False)
    structure_state(model)
    for name, m in LLAMA.decoder_linears(model).items():
        assert NMPattern(2, 4).holds(m.weight != 0), name
    assert [s["target"] for s in report.shots] == ["0.8 remaining", "2:4"]
    # The structured shot's groups stay removed under 2:4 (they used to come back: sparsity exactly 0.5).
    assert report.removal and any(any(layer.values()) for layer in report.removal.values())
    assert report.sparsity > report.shots[0]["sparsity"] + 0.5 * (1 - report.shots[0]["sparsity"]) - 0.05


def test_structured_two_four_saves_removed_groups_as_zeros(tiny_llama_dir, text_file, tmp_path) -> None:
    """Cutting down_proj's removed input columns would shift its 2:4 blocks: the saved model keeps its
    shapes, every removed group zero and every decoder linear 2:4."""
    from safetensors.torch import load_file

    from base.loading import load_model
    from surgeon_export import api

    lm = load_model(tiny_llama_dir)
    shapes = {k: v.shape for k, v in lm.model.state_dict().items()}
    report = api.prune(lm, api.build_config("surgeon", structured=0.8, pattern="2:4", shots=1), calib_text=text_file,
                       calib_samples=16, seq_len=16)
    written = api.save(lm, tmp_path / "out", report)
    assert report.removal and "shrink" not in written and written["removal"] == report.removal
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: saved[k].shape for k in shapes if k in saved} == {k: v for k, v in shapes.items() if k in saved}
    for name in lm.adapter.decoder_linears(lm.model):
        assert NMPattern(2, 4).holds(saved[f"{name}.weight"] != 0), name
    for i, layer in report.removal.items():
        down = saved[f"model.layers.{i}.mlp.down_proj.weight"]
        assert (down[:, layer["channels"]] == 0).all()


def test_select_ranks_by_cost_per_weight_and_reports_impossible() -> None:
    heads = Candidate(0, "heads", torch.tensor([0, 2]), 4.0, 100)  # 0.04 per weight
    cheap = Candidate(1, "channel", torch.tensor([3]), 0.5, 10)  # 0.05 per weight
    dear = Candidate(0, "channel", torch.tensor([0]), 1.0, 10)  # 0.10 per weight
    assert select([dear, cheap, heads], budget=100) == [heads]
    assert select([dear, cheap, heads], budget=105) == [heads, cheap]
    assert select([dear, cheap, heads], budget=120) == [heads, cheap, dear]
    with pytest.raises(SurgeonError, match="cannot be reached"):
        select([dear, cheap, heads], budget=1000)


def test_head_rows() -> None:
    assert head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_bad_structured_settings() -> None:
    with pytest.raises(SurgeonError, match="remaining fraction"):
        SurgeonConfig(structured=0.0)
    with pytest.raises(SurgeonError, match="SDS refinement works on unstructured and N:M targets"):
        SurgeonConfig(structured=0.8, refine=SDSConfig())


@pytest.mark.parametrize("scoring", ["surgeon", "magnitude", "wanda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_structured_scoring_in_every_family(family: str, scoring: str) -> None:
    """Every family surgery supports: coupled groups through the adapter (OPT: fc1/fc2, no GQA, so a
    head goes with its k and v rows), the recorded plan cuts the model without changing its logits."""
    model = make_model(family, dtype=torch.float32)
    adapter = get_adapter(model.config.model_type)
    with torch.no_grad():  # heads 0 and 3 (one per KV group) nearly silent: every scoring must take them
        for layer in adapter.decoder_layers(model):
            idx = head_rows(torch.tensor([0, 3]), 8)
            adapter.linear(layer, adapter.head_rows[0]).weight[idx] *= 1e-3
            adapter.linear(layer, adapter.head_cols[0]).weight[:, idx] *= 1e-3
    ids = torch.randint(2, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    before = sum(m.weight.numel() for m in adapter.decoder_linears(model).values())
    cfg = SurgeonConfig(structured=0.6, shots=1, scoring=scoring, allocation="global")  # type: ignore[arg-type]
    report = prune_surgeon_(model, adapter, ids, cfg, progress=False)
    plan = RemovalPlan.from_dict(report.removal)
    heads = "heads" if adapter.grouped_kv else "kv_groups"  # without GQA a head is its KV group
    assert all(set(getattr(plan.get(i), heads)) >= {0, 3} for i in range(3))
    assert plan == find_zero_groups(model, adapter)  # the plan is exactly what was zeroed
    with torch.no_grad():
        masked = model(ids).logits
    manifest = shrink_(model, adapter, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked, rtol=0, atol=1e-5)
    assert sum(m.weight.numel() for m in adapter.decoder_linears(model).values()) <= 0.6 * before
    if not adapter.grouped_kv:  # a removed head took its KV head along
        assert any(a.num_key_value_heads < b.num_key_value_heads for a, b in zip(manifest.after, manifest.before))


def test_magnitude_scores_remove_the_smallest_channel_first() -> None:
    model, _ = make_tiny_llama()
    layer = model.model.layers[1].mlp
    with torch.no_grad():
        for w in (layer.gate_proj.weight[5], layer.up_proj.weight[5], layer.down_proj.weight[:, 5]):
            w.mul_(1e-3)
    total = sum(m.weight.numel() for m in LLAMA.decoder_linears(model).values())
    one_channel = 3 * 32 / total
    prune_surgeon_(model, LLAMA, None, SurgeonConfig(structured=1 - one_channel, shots=1, scoring="magnitude"),
                   progress=False)
    removed = [(i, int(k)) for i, l in enumerate(model.model.layers) for k in (l.mlp.gate_proj.weight == 0).all(1).nonzero()]
    assert removed == [(1, 5)]


@pytest.mark.parametrize("scoring", ["surgeon", "wanda"])
def test_uniform_structured_removes_equal_channels_and_no_heads(scoring: str) -> None:
    model, _ = make_tiny_llama()
    cfg = SurgeonConfig(structured=0.8, shots=1, allocation="uniform", scoring=scoring)  # type: ignore[arg-type]
    prune_surgeon_(model, LLAMA, calib(model), cfg, progress=False)
    state = structure_state(model)
    counts = {int(ch.sum()) for ch, _ in state}
    assert len(counts) == 1 and counts.pop() > 0
    assert not any(bool(heads.any()) for _, heads in state)


def test_output_group_cost_updates_only_the_output_side() -> None:
    """group_cost="output": channel cost = down_proj column cost; down_proj's remaining columns get
    the exact joint column update through A^-1; gate/up rows are only zeroed, the rest untouched."""
    from surgeon.calibrate import kfac_factors
    from surgeon.curvature.kfac import prepare
    from surgeon.prune.costs import col_costs
    from surgeon.prune.update import update_cols

    model, _ = make_tiny_llama()
    windows = calib(model)
    factors = kfac_factors(model, LLAMA, windows)
    cfg = SurgeonConfig(structured=0.85, shots=1, allocation="uniform", group_cost="output")
    before = {n: m.weight.detach().clone() for n, m in LLAMA.decoder_linears(model).items()}
    prune_surgeon_(model, LLAMA, windows, cfg, progress=False)
    for i, layer in enumerate(model.model.layers):
        down = f"model.layers.{i}.mlp.down_proj"
        d = prepare(factors[down].A, factors[down].G, cfg.lam_A, 0.01)  # structured G damping
        removed = (layer.mlp.gate_proj.weight == 0).all(1).nonzero().squeeze(1)
        assert len(removed) > 0
        cost = col_costs(before[down].double(), d.G, d.A_inv)
        assert set(removed.tolist()) == set(cost.argsort()[: len(removed)].tolist())  # the cheapest columns
        want = update_cols(before[down].double(), d.A_inv, removed).float()
        torch.testing.assert_close(layer.mlp.down_proj.weight.detach(), want, rtol=1e-5, atol=1e-6)
        for key in ("gate_proj", "up_proj"):
            W, W0 = layer.mlp.get_submodule(key).weight, before[f"model.layers.{i}.mlp.{key}"]
            kept = torch.ones(W.shape[0], dtype=torch.bool)
            kept[removed] = False
            assert torch.equal(W[kept], W0[kept]) and (W[removed] == 0).all()
