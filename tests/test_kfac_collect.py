"""K-FAC factors collected with hooks, against gradients computed independently with autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from base.adapters import LLAMA
from surgeon.calibrate import kfac_factors
from tests.conftest import make_tiny_llama


def explicit_factors(model, windows):
    """Per-token inputs and output gradients via retain_grad, then A = mean x xᵀ, G = mean g gᵀ."""
    linears = LLAMA.decoder_linears(model)
    inputs, outputs = {}, {}
    handles = []
    for name, m in linears.items():
        def hook(_m, args, out, name=name):
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out
        handles.append(m.register_forward_hook(hook))
    logits = model(windows).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    result = {}
    for name in linears:
        x = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
        g = outputs[name].grad.reshape(-1, outputs[name].shape[-1]).double()
        result[name] = (x.T @ x / x.shape[0], g.T @ g / g.shape[0])
    return result


def test_kfac_factors_match_autograd() -> None:
    model, _ = make_tiny_llama(dtype=torch.float64)
    windows = torch.randint(2, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    factors = kfac_factors(model, LLAMA, windows, batch_size=2)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    expected = explicit_factors(model, windows)
    assert set(factors) == set(expected)
    one_at_a_time = kfac_factors(model, LLAMA, windows, batch_size=1)  # prune --kfac-batch 1: the same factors
    for name, (A, G) in expected.items():
        torch.testing.assert_close(factors[name].A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(one_at_a_time[name].A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(one_at_a_time[name].G, factors[name].G, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(factors[name].G, G, rtol=1e-10, atol=1e-12)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert factors[q].A is factors[k].A  # one tensor for linears sharing an input


def test_true_fisher_differs_and_is_seeded() -> None:
    model, _ = make_tiny_llama()
    windows = torch.randint(2, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    emp = kfac_factors(model, LLAMA, windows)
    true1 = kfac_factors(model, LLAMA, windows, fisher="true", seed=3)
    true2 = kfac_factors(model, LLAMA, windows, fisher="true", seed=3)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(true1[name].G, true2[name].G)
    torch.testing.assert_close(true1[name].A, emp[name].A)  # inputs do not depend on labels
    assert not torch.allclose(true1[name].G, emp[name].G)


def test_named_factors_are_the_full_runs_for_those_linears() -> None:
    """``names``: only those linears' moments are formed, each equal to the full collection's, bit for bit."""
    model, _ = make_tiny_llama()
    windows = torch.randint(2, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    full = kfac_factors(model, LLAMA, windows, batch_size=2)
    some = kfac_factors(model, LLAMA, windows, batch_size=2, names=["self_attn.o_proj", "mlp.down_proj"])
    assert sorted(some) == sorted(n for n in full if n.endswith(("o_proj", "down_proj")))
    for name, f in some.items():
        assert torch.equal(f.A, full[name].A) and torch.equal(f.G, full[name].G), name
