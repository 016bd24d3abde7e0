"""SDS refinement: statistics against explicit activations, each step against exact references,
and the driver end to end on tiny random Llamas (held-out error falls, patterns hold)."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch

from base.adapters import LLAMA
from base.errors import SurgeonError
from base.patterns import NMPattern
from surgeon.baselines.sparsegpt import prune_sparsegpt
from surgeon.baselines.wanda import prune_wanda
from surgeon.calibrate import _hidden, capture_layer_inputs
from surgeon.driver import PruneConfig, prune_sequential_
from surgeon.sds import (
    PairStats,
    SDSConfig,
    _fista,
    pair_moments,
    refine_linear,
    relative_error,
)
from tests.conftest import make_tiny_llama
from tests.test_driver import windows_for

P24 = NMPattern.parse("2:4")


def _inputs(layer: torch.nn.Module, name: str, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit inputs and outputs of one linear over all batches, [tokens, d]."""
    xs, ys = [], []

    def hook(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        xs.append(args[0].reshape(-1, args[0].shape[-1]))
        ys.append(out.reshape(-1, out.shape[-1]))

    handle = layer.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for b in batches:
            layer(b.hidden, **b.kwargs)
    handle.remove()
    return torch.cat(xs).double(), torch.cat(ys).double()


def _random_stats(d_out: int = 12, d_in: int = 16, tokens: int = 400, seed: int = 0):
    """Teacher/student inputs with a known relation, their statistics, and the dense weights."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d_in, dtype=torch.float64)
    Xs = X + 0.3 * torch.randn(tokens, d_in, generator=g, dtype=torch.float64)  # student inputs carry error
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    stats = PairStats(Xs.T @ Xs / tokens, X.T @ Xs / tokens, float((X @ W0.T).pow(2).sum()) / tokens, tokens)
    return W0, X, Xs, stats


def test_pair_moments_equal_explicit_activations() -> None:
    model, _ = make_tiny_llama()
    teacher, _ = make_tiny_llama()
    with torch.no_grad():  # the student differs from the teacher, as after pruning
        for p in model.model.layers[0].parameters():
            p.mul_(0.9)
    windows = windows_for(model)
    batches = capture_layer_inputs(model, LLAMA, windows, batch_size=4)
    t_batches = [b.at(b.index, b.hidden + 0.1) for b in batches]  # a different teacher stream
    student, t_layer = model.model.layers[0], teacher.model.layers[0]
    stats, outs = pair_moments(student, t_layer, LLAMA, batches, t_batches, LLAMA.input_groups, teacher_outputs=True)
    for name in ("self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        xs, _ = _inputs(student, name, batches)
        xt, yt = _inputs(t_layer, name, t_batches)
        n = xs.shape[0]
        torch.testing.assert_close(stats[name].A, xs.T @ xs / n, rtol=1e-5, atol=1e-6)  # float32 products
        torch.testing.assert_close(stats[name].C, xt.T @ xs / n, rtol=1e-5, atol=1e-6)
        assert stats[name].y == pytest.approx(float(yt.pow(2).sum()) / n, rel=1e-6)
        assert stats[name].tokens == n == windows.numel()
    with torch.no_grad():
        want = torch.cat([_hidden(t_layer(b.hidden, **b.kwargs)) for b in t_batches])
    torch.testing.assert_close(torch.cat([b.hidden for b in outs]), want)


def test_relative_error_equals_explicit_reconstruction_error() -> None:
    W0, X, Xs, stats = _random_stats()
    W = W0 * (torch.rand(W0.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    B = W0 @ stats.C
    explicit = float((Xs @ W.T - X @ W0.T).pow(2).sum() / (X @ W0.T).pow(2).sum())
    assert relative_error(W, stats.A, B, stats.y) == pytest.approx(explicit, rel=1e-9)


def test_dense_step_without_regulariser_converges_to_least_squares() -> None:
    W0, X, Xs, stats = _random_stats()
    B = W0 @ stats.C
    exact = torch.linalg.solve(stats.A, B.T).T  # argmin ||W Xs - W0 X||^2
    start = torch.zeros_like(W0)
    errors = [relative_error(_fista(start, stats.A, B, k), stats.A, B, stats.y) for k in (0, 5, 50)]
    assert errors[0] > errors[1] > errors[2]  # the reconstruction error falls during the dense step
    torch.testing.assert_close(_fista(start, stats.A, B, 3000).double(), exact, atol=1e-4, rtol=1e-4)


def test_l1_step_matches_the_closed_form_lasso_for_a_diagonal_second_moment() -> None:
    """With diagonal A the objective separates: w = soft(b / a, threshold / a)."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(10, generator=g, dtype=torch.float64) + 0.5
    B = torch.randn(6, 10, generator=g, dtype=torch.float64)
    threshold = 0.4
    got = _fista(torch.zeros_like(B), torch.diag(a), B, 500, threshold=threshold).double()
    z = B / a
    want = torch.sign(z) * torch.clamp(z.abs() - threshold / a, min=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert int((got == 0).sum()) == int((want == 0).sum()) > 0


def test_masked_adjustment_keeps_the_mask_and_solves_each_row_exactly() -> None:
    W0, _, _, stats = _random_stats()
    B = W0 @ stats.C
    keep = P24.mask_from_scores(W0.abs())
    got = _fista(W0 * keep, stats.A, B, 4000, mask=keep.double()).double()
    assert torch.equal(got != 0, keep)
    for r in range(W0.shape[0]):  # row r: minimise over its kept weights only
        idx = keep[r].nonzero().squeeze(1)
        exact = torch.linalg.solve(stats.A[idx][:, idx], B[r, idx])
        torch.testing.assert_close(got[r, idx], exact, atol=1e-4, rtol=1e-4)


def test_ridge_pulls_towards_the_anchor_like_sparsegpt_damping() -> None:
    """Masked, with ridge l toward W0: each row solves (A_KK + l I) w = B_K + l W0_K (SparseGPT's damped OBS)."""
    W0, _, _, stats = _random_stats()
    B = W0 @ stats.C
    keep = P24.mask_from_scores(W0.abs())
    ridge = 0.3 * float(stats.A.diagonal().mean())
    got = _fista(W0 * keep, stats.A, B, 4000, ridge=ridge, anchor=W0, mask=keep.double()).double()
    shrunk = _fista(W0 * keep, stats.A, B, 4000, ridge=ridge, mask=keep.double()).double()
    for r in range(W0.shape[0]):
        idx = keep[r].nonzero().squeeze(1)
        M = stats.A[idx][:, idx] + ridge * torch.eye(len(idx), dtype=torch.float64)
        torch.testing.assert_close(got[r, idx], torch.linalg.solve(M, B[r, idx] + ridge * W0[r, idx]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(shrunk[r, idx], torch.linalg.solve(M, B[r, idx]), atol=1e-4, rtol=1e-4)
    assert (got - W0 * keep).norm() < (shrunk - W0 * keep).norm()  # the anchor keeps the dense weights closer


def test_refine_linear_lowers_the_error_and_keeps_the_pattern() -> None:
    W0, _, _, stats = _random_stats(d_out=16, d_in=32)
    W1, _ = prune_sparsegpt(W0, stats.A, stats.tokens, P24)
    W, record = refine_linear(W0, W1, stats, P24, prune_sparsegpt, SDSConfig())
    assert P24.holds(W != 0) and not record["fallback"]
    assert record["final"] < record["first"] and record["adjusted"] < record["first"]
    assert record["dense"] < record["first"]  # re-densified weights reconstruct better than the sparse ones
    assert record["used"] == min(record["final"], record["adjusted"])  # the better of the two masks
    assert record["choice"] == ("sds" if record["final"] < record["adjusted"] else "first mask")
    assert relative_error(W, stats.A, W0 @ stats.C, stats.y) == pytest.approx(record["used"])


def test_refine_falls_back_to_first_round_when_refinement_fails(caplog: pytest.LogCaptureFixture) -> None:
    W0, _, _, stats = _random_stats()
    W1, _ = prune_wanda(W0, stats.A, stats.tokens, 0.5)

    def broken(W: torch.Tensor, A: torch.Tensor, n: int, target: object) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(W, float("nan")), torch.ones_like(W, dtype=torch.bool)

    with caplog.at_level(logging.WARNING, logger="surgeon.sds"):
        W, record = refine_linear(W0, W1, stats, 0.5, broken, SDSConfig(epochs=5, adjust_epochs=5), "layer.x")
    assert record["choice"] == "first mask" and torch.isfinite(W).all() and torch.equal(W != 0, W1 != 0)
    assert record["used"] < record["first"]
    assert "layer.x" in caplog.text and "non-finite" in caplog.text
    W, record = refine_linear(W0, W1, stats, 0.5, broken, SDSConfig(epochs=5, adjust_epochs=0), "layer.x")
    assert record["fallback"] and record["choice"] == "first" and torch.equal(W, W1)  # nothing better: W1 itself


@pytest.mark.parametrize("bad", [dict(l1=-1.0), dict(l2=float("nan")), dict(epochs=-1)])
def test_bad_hyperparameters_are_refused(bad: dict) -> None:
    with pytest.raises(SurgeonError, match="SDS"):
        SDSConfig(**bad)


def _held_out_error(model: torch.nn.Module, dense: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        got = model.model(input_ids=windows).last_hidden_state
        want = dense.model(input_ids=windows).last_hidden_state
    return float((got - want).pow(2).sum() / want.pow(2).sum())


@pytest.mark.parametrize("method,target,teacher", [("sparsegpt", P24, "self"), ("wanda", P24, "self"),
                                                   ("sparsegpt", 0.6, "self"), ("sparsegpt", P24, "layer")])
def test_driver_sds_beats_one_shot_on_held_out_windows(method: str, target: object, teacher: str) -> None:
    dense, _ = make_tiny_llama(intermediate_size=128)
    calib, held_out = windows_for(dense, n=24, seq_len=32), windows_for(dense, n=8, seq_len=32, seed=7)
    kw = dict(pattern=target) if isinstance(target, NMPattern) else dict(sparsity=target)
    one_shot, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_sequential_(one_shot, LLAMA, calib, PruneConfig(method, **kw), progress=False)
    report = prune_sequential_(refined, LLAMA, calib, PruneConfig(method, refine=SDSConfig(teacher=teacher), **kw),
                               progress=False)
    for name, linear in LLAMA.decoder_linears(refined).items():
        if isinstance(target, NMPattern):
            assert target.holds(linear.weight != 0), name
    assert report.sparsity == pytest.approx(_sparsity(one_shot), abs=1e-3)
    assert _held_out_error(refined, dense, held_out) < _held_out_error(one_shot, dense, held_out)
    summary = report.to_dict()["refine"]["summary"]
    assert summary["linears"] == 14 and summary["mean_error_used"] < summary["mean_error"]["first"]
    assert len(report.layer_seconds) == 2


def _sparsity(model: torch.nn.Module) -> float:
    linears = LLAMA.decoder_linears(model).values()
    return sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)


def test_sds_after_a_global_pruner_keeps_each_linears_sparsity() -> None:
    """Teacher mode: the model is the first round (here magnitude at a different sparsity per
    linear, as a global allocation gives); SDS re-prunes each linear to its own count."""
    dense, _ = make_tiny_llama(intermediate_size=128)
    calib, held_out = windows_for(dense, n=24, seq_len=32), windows_for(dense, n=8, seq_len=32, seed=7)
    model = copy.deepcopy(dense)
    fractions = {}
    for i, (name, linear) in enumerate(LLAMA.decoder_linears(model).items()):
        fractions[name] = (0.3, 0.5, 0.7)[i % 3]
        W = linear.weight.data
        k = int(W.numel() * fractions[name])
        cut = W.abs().flatten().kthvalue(k).values
        W.mul_(W.abs() > cut)
    first_error = _held_out_error(model, dense, held_out)
    report = prune_sequential_(model, LLAMA, calib, PruneConfig("sparsegpt", refine=SDSConfig()),
                               teacher=dense, progress=False)
    for name, linear in LLAMA.decoder_linears(model).items():
        assert float((linear.weight == 0).float().mean()) == pytest.approx(fractions[name], abs=0.02), name
    assert _held_out_error(model, dense, held_out) < first_error
    assert report.refine


def test_teacher_without_refinement_and_magnitude_without_data_are_refused() -> None:
    dense, _ = make_tiny_llama()
    with pytest.raises(ValueError, match="teacher"):
        prune_sequential_(copy.deepcopy(dense), LLAMA, windows_for(dense), PruneConfig("sparsegpt", 0.5),
                          teacher=dense, progress=False)
    with pytest.raises(SurgeonError, match="calibration"):
        prune_sequential_(dense, LLAMA, None, PruneConfig("magnitude", 0.5, refine=SDSConfig()), progress=False)


def _layer_input(model: torch.nn.Module, index: int, windows: torch.Tensor) -> SimpleNamespace:
    """What decoder layer ``index`` of ``model`` gets on ``windows`` (its input stream), as a batch for :func:`_inputs`."""
    seen = SimpleNamespace()

    def hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.hidden, seen.kwargs = args[0], kwargs

    handle = model.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)  # no cache: the layer can be called again with these arguments
    handle.remove()
    return seen


@pytest.mark.parametrize("teacher", ["self", "layer", "dense"])
def test_each_sds_teacher_reconstructs_its_own_target(teacher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics every linear's SDS gets, against explicit activations of the finished models. The student's
    inputs are the pruned model's own (each linear sees the linears before it in their final state: SDS re-collects
    per group). The teacher's: the same inputs for "self"; the dense layer run on the pruned model's stream for
    "layer" (the same as the student's for q/k/v and gate/up, whose inputs no pruned linear of the layer touched yet;
    not for o_proj / down_proj: errors earlier in the layer are corrected); the dense model's own for "dense"."""
    import surgeon.driver

    dense, _ = make_tiny_llama()
    windows = windows_for(dense, n=8, seq_len=16)
    stats: dict[str, PairStats] = {}
    real = surgeon.driver.refine_linear

    def record(W0: torch.Tensor, W1: torch.Tensor, pair: PairStats, *args: object) -> tuple:
        stats[str(args[-1])] = pair
        return real(W0, W1, pair, *args)

    monkeypatch.setattr(surgeon.driver, "refine_linear", record)
    model = copy.deepcopy(dense)
    cfg = PruneConfig("sparsegpt", pattern=P24, refine=SDSConfig(teacher=teacher, epochs=20, adjust_epochs=20))
    report = prune_sequential_(model, LLAMA, windows, cfg, progress=False)
    assert report.to_dict()["config"]["refine"]["teacher"] == teacher and len(stats) == 14
    same_input = {}
    for index in range(2):
        student_in = _layer_input(model, index, windows)
        teacher_in = student_in if teacher == "layer" else _layer_input(dense, index, windows)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            xs, _ = _inputs(model.model.layers[index], name, [student_in])
            xt = xs if teacher == "self" else _inputs(dense.model.layers[index], name, [teacher_in])[0]
            full = f"model.layers.{index}.{name}"
            W0, got, n = dense.get_submodule(full).weight.detach().double(), stats[full], xs.shape[0]
            torch.testing.assert_close(got.A, xs.T @ xs / n, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.C, xt.T @ xs / n, rtol=1e-5, atol=1e-6)
            assert got.y == pytest.approx(float((xt @ W0.T).pow(2).sum()) / n, rel=1e-5)
            assert got.tokens == n == windows.numel()
            same_input[index, name] = torch.allclose(got.C, got.A, rtol=1e-5, atol=1e-6)
    # what tells the three apart: the teacher's inputs equal the student's where nothing it corrects came before
    assert same_input[1, "self_attn.q_proj"] == (teacher != "dense")  # the stream after a pruned layer
    assert same_input[0, "self_attn.o_proj"] == (teacher == "self")  # after this layer's pruned q/k/v
    assert same_input[0, "self_attn.q_proj"]  # the embeddings: the same stream for every teacher

