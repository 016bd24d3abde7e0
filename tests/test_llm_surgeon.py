"""LLM Surgeon driver: allocation, schedules, frozen masks, N:M, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from base.adapters import LLAMA
from base.errors import SurgeonError
from base.patterns import NMPattern
from surgeon.baselines.sparsegpt import prune_sparsegpt
from surgeon.calibrate import kfac_factors
from surgeon.curvature.kfac import prepare
from surgeon.llm_surgeon import SurgeonConfig, prune_surgeon_
from surgeon.prune.threshold import global_keep_masks
from surgeon.prune.update import update_masked
from tests.conftest import make_tiny_llama


def calib(model, n: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))


def test_global_masks_pick_cheapest_across_layers() -> None:
    costs = {"a": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "b": torch.tensor([[0.5, 10.0, 20.0, 30.0]])}
    masks = global_keep_masks(costs, fraction=0.375, max_layer_fraction=1.0)  # remove 3 of 8
    assert masks["a"].tolist() == [[False, False, True, True]]
    assert masks["b"].tolist() == [[False, True, True, True]]


def test_global_masks_respect_the_ceiling_and_reallocate() -> None:
    costs = {"a": torch.arange(10.0)[None], "b": torch.arange(100.0, 110.0)[None]}
    masks = global_keep_masks(costs, fraction=0.5, max_layer_fraction=0.8)  # 10 of 20; a may lose 8
    assert int((~masks["a"]).sum()) == 8
    assert int((~masks["b"]).sum()) == 2
    assert masks["b"][0, :2].logical_not().all()  # the cheapest of b
    with pytest.raises(SurgeonError, match="ceiling"):
        global_keep_masks(costs, fraction=0.9, max_layer_fraction=0.5)


def test_schedules() -> None:
    assert SurgeonConfig(sparsity=0.6, shots=3).shot_targets() == pytest.approx([0.2, 0.4, 0.6])
    assert SurgeonConfig(pattern=NMPattern(2, 4), shots=2).shot_targets() == [NMPattern(1, 4), NMPattern(2, 4)]
    assert SurgeonConfig(pattern=NMPattern(2, 4), shots=5).shot_targets() == [NMPattern(1, 4), NMPattern(2, 4)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one target"),
        (dict(sparsity=0.5, pattern=NMPattern(2, 4)), "exactly one target"),
        (dict(sparsity=1.2), "sparsity must be in"),
        (dict(sparsity=0.5, shots=0), "shots must be at least 1"),
        (dict(sparsity=0.95), "per-layer ceiling"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(SurgeonError, match=message):
        SurgeonConfig(**kwargs)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("correlation", ["joint", "rows", "none"])
def test_unstructured_hits_target_and_freezes_masks(allocation: str, correlation: str) -> None:
    model, _ = make_tiny_llama()
    cfg = SurgeonConfig(sparsity=0.5, shots=2, allocation=allocation, correlation=correlation)  # type: ignore[arg-type]
    report = prune_surgeon_(model, LLAMA, calib(model), cfg, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=2e-3)
    assert [s["shot"] for s in report.shots] == [1, 2]
    assert report.shots[0]["sparsity"] == pytest.approx(0.25, abs=2e-3)
    if allocation == "uniform":
        for name, layer in report.layers.items():
            assert layer["sparsity"] == pytest.approx(0.5, abs=1e-3), name
    else:
        assert max(v["sparsity"] for v in report.layers.values()) <= cfg.max_layer_sparsity + 1e-9


def test_masks_of_earlier_shots_stay_removed() -> None:
    model, _ = make_tiny_llama()
    windows = calib(model)
    prune_surgeon_(model, LLAMA, windows, SurgeonConfig(sparsity=0.3, shots=1), progress=False)
    first = {n: m.weight == 0 for n, m in LLAMA.decoder_linears(model).items()}
    prune_surgeon_(model, LLAMA, windows, SurgeonConfig(sparsity=0.6, shots=1), progress=False)
    for name, m in LLAMA.decoder_linears(model).items():
        assert (m.weight[first[name]] == 0).all(), name


def test_two_four_pattern_holds() -> None:
    model, _ = make_tiny_llama()
    report = prune_surgeon_(model, LLAMA, calib(model), SurgeonConfig(pattern=NMPattern(2, 4), shots=2), progress=False)
    for name, m in LLAMA.decoder_linears(model).items():
        assert NMPattern(2, 4).holds(m.weight != 0), name
    assert report.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("correlation", ["none", "rows", "joint"])
def test_nm_shot_is_sparsegpt_sweep_with_kfac_A_then_G_correlation(correlation: str) -> None:
    """One N:M shot = SparseGPT's adaptive sweep on K-FAC's damped A; "rows" then spreads each
    row's update through G^-1, "joint" solves the whole mask exactly under G x A (update_masked),
    "none" keeps the sweep's weights."""
    model, _ = make_tiny_llama()
    windows = calib(model)
    factors = kfac_factors(model, LLAMA, windows)
    cfg = SurgeonConfig(pattern=NMPattern(2, 4), shots=1, correlation=correlation)
    expected = {}
    for name, m in LLAMA.decoder_linears(model).items():
        d = prepare(factors[name].A, factors[name].G, cfg.lam_A, cfg.damping_G(NMPattern(2, 4)))
        W = m.weight.detach().double()
        W_rows, keep = prune_sparsegpt(W, d.A, 0, NMPattern(2, 4), percdamp=0.0)
        expected[name] = update_masked(W, d.A_inv, d.G_inv, keep, correlation, U=W - W_rows, A=d.A, G=d.G).float()
    prune_surgeon_(model, LLAMA, windows, cfg, progress=False)
    for name, m in LLAMA.decoder_linears(model).items():
        torch.testing.assert_close(m.weight.detach(), expected[name], rtol=1e-5, atol=1e-6)
        assert NMPattern(2, 4).holds(m.weight != 0), name


def test_sparsegpt_nm_selection_removes_forced_weights_first() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g)
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    A = X.T @ X / 64
    allowed = torch.ones_like(W, dtype=torch.bool)
    allowed[:, ::4] = False  # the first weight of every block must go
    W_new, keep = prune_sparsegpt(W, A, 0, NMPattern(2, 4), allowed=allowed)
    assert not keep[~allowed].any() and NMPattern(2, 4).holds(keep)
    assert torch.equal(W_new == 0, ~keep)
    free = prune_sparsegpt(W, A, 0, NMPattern(2, 4), allowed=torch.ones_like(allowed))
    torch.testing.assert_close(free[0], prune_sparsegpt(W, A, 0, NMPattern(2, 4))[0])
    with pytest.raises(SurgeonError, match="allowed"):
        prune_sparsegpt(W, A, 0, 0.5, allowed=allowed)


def test_resume_equals_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.llm_surgeon as mod

    cfg = SurgeonConfig(sparsity=0.4, shots=2)
    reference, _ = make_tiny_llama()
    prune_surgeon_(reference, LLAMA, calib(reference), cfg, progress=False)

    model, _ = make_tiny_llama()
    calls = {"n": 0}
    real = mod.kfac_factors

    def interrupt_second_shot(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "kfac_factors", interrupt_second_shot)
    with pytest.raises(KeyboardInterrupt):
        prune_surgeon_(model, LLAMA, calib(model), cfg, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(mod, "kfac_factors", real)
    fresh, _ = make_tiny_llama()  # a new process would start from the original weights
    report = prune_surgeon_(fresh, LLAMA, calib(fresh), cfg, checkpoint_dir=tmp_path, progress=False)
    assert [s["shot"] for s in report.shots] == [1, 2]
    for (name, a), b in zip(LLAMA.decoder_linears(reference).items(), LLAMA.decoder_linears(fresh).values()):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0, msg=name)
    with pytest.raises(SurgeonError, match="other settings"):
        prune_surgeon_(fresh, LLAMA, calib(fresh), SurgeonConfig(sparsity=0.5, shots=2), checkpoint_dir=tmp_path,
                       progress=False)


def test_kfac_windows_split_G_from_few_A_from_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """--kfac-samples: backward passes see the first k windows; A comes from every window."""
    import surgeon.llm_surgeon as ls

    model, _ = make_tiny_llama()
    windows = calib(model, n=6)
    seen: dict[str, int] = {}
    real_kfac, real_inputs = ls.kfac_factors, ls.input_factors

    def kfac(m, a, w, **kw):
        seen["kfac"] = w.shape[0]
        return real_kfac(m, a, w, **kw)

    def inputs(m, a, w, **kw):
        seen["inputs"] = w.shape[0]
        out = real_inputs(m, a, w, **kw)
        seen["A"] = out
        return out

    monkeypatch.setattr(ls, "kfac_factors", kfac)
    monkeypatch.setattr(ls, "input_factors", inputs)
    prune_surgeon_(model, LLAMA, windows, SurgeonConfig(sparsity=0.5, shots=1, kfac_windows=2), progress=False)
    assert seen["kfac"] == 2 and seen["inputs"] == 6
    fresh, _ = make_tiny_llama()
    full_A = real_inputs(fresh, LLAMA, windows)
    torch.testing.assert_close(seen["A"]["model.layers.0.mlp.down_proj"], full_A["model.layers.0.mlp.down_proj"])
    with pytest.raises(SurgeonError, match="K-FAC windows"):
        SurgeonConfig(sparsity=0.5, kfac_windows=0)
