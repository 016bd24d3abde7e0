"""The sequential layer-by-layer driver and the pruned-checkpoint writer, on tiny random Llamas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from base.adapters import LLAMA
from base.errors import SurgeonError
from base.loading import load_model
from base.patterns import NMPattern
from export.checkpoint import REPORT_FILE, save_checkpoint, write_atomically
from surgeon.baselines.magnitude import prune_magnitude
from surgeon.baselines.wanda import prune_wanda
from surgeon.calibrate import capture_layer_inputs, input_moments, run_layer
from surgeon.curvature.activations import SecondMoment
from surgeon.driver import PruneConfig, prune_sequential_
from tests.conftest import make_tiny_llama


def windows_for(model, n: int = 6, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (n, seq_len), generator=g)


def test_captured_inputs_equal_embeddings_and_moments_equal_explicit() -> None:
    model, _ = make_tiny_llama()
    windows = windows_for(model)
    batches = capture_layer_inputs(model, LLAMA, windows, batch_size=4)
    assert [b.hidden.shape[0] for b in batches] == [4, 2]
    torch.testing.assert_close(torch.cat([b.hidden for b in batches]), model.model.embed_tokens(windows))
    layer = model.model.layers[0]
    moments = input_moments(layer, LLAMA, batches)
    assert moments["self_attn.q_proj"] is moments["self_attn.v_proj"]
    x = layer.input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 32).double()
    torch.testing.assert_close(moments["self_attn.k_proj"].finalize(), x.T @ x / x.shape[0])


def test_run_layer_consumes_its_inputs_and_gives_each_batch_its_output() -> None:
    """The layer boundary is held once: the input list is emptied, and the outputs are the layer's, in order."""
    model, _ = make_tiny_llama()
    batches = capture_layer_inputs(model, LLAMA, windows_for(model), batch_size=4)
    layer = model.model.layers[0]
    with torch.no_grad():
        outputs = [layer(b.hidden, **b.kwargs) for b in batches]
    expected = [o[0] if isinstance(o, tuple) else o for o in outputs]
    out = run_layer(layer, batches)
    assert batches == []
    assert [o.hidden.shape[0] for o in out] == [4, 2]
    for got, want in zip(out, expected):
        assert torch.equal(got.hidden, want)


def test_magnitude_through_driver_equals_per_matrix_magnitude() -> None:
    model, _ = make_tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in LLAMA.decoder_linears(model).items()}
    report = prune_sequential_(model, LLAMA, None, PruneConfig("magnitude", sparsity=0.5), progress=False)
    for name, linear in LLAMA.decoder_linears(model).items():
        expected, _ = prune_magnitude(original[name], None, 0, 0.5)
        assert torch.equal(linear.weight, expected), name
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_wanda_layer1_statistics_come_from_pruned_layer0() -> None:
    """Sequential semantics: layer l+1 is pruned with inputs produced by the already pruned layer l."""
    model, _ = make_tiny_llama()
    reference, _ = make_tiny_llama()
    windows = windows_for(model)
    prune_sequential_(model, LLAMA, windows, PruneConfig("wanda", sparsity=0.5, batch_size=4), progress=False)
    # Rebuild layer 1's expected weights from the driver's pruned layer 0 plus the original layer 1.
    with torch.no_grad():
        reference.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
        hidden = reference(windows, output_hidden_states=True).hidden_states[1]  # output of pruned layer 0
        layer1 = reference.model.layers[1]
        x = layer1.input_layernorm(hidden)
        acc = SecondMoment(32)
        acc.update(x)
        expected, _ = prune_wanda(layer1.self_attn.q_proj.weight, acc.finalize(), windows.numel(), 0.5)
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_every_method_hits_the_2_4_pattern(method: str, true_sequential: bool) -> None:
    model, _ = make_tiny_llama()
    pattern = NMPattern(2, 4)
    cfg = PruneConfig(method, pattern=pattern, true_sequential=true_sequential)  # type: ignore[arg-type]
    report = prune_sequential_(model, LLAMA, windows_for(model), cfg, progress=False)
    for name, linear in LLAMA.decoder_linears(model).items():
        assert pattern.holds(linear.weight != 0), name
    assert report.sparsity == pytest.approx(0.5)


def test_sparsegpt_beats_magnitude_on_calibration_loss() -> None:
    results = {}
    for method in ("magnitude", "sparsegpt"):
        model, _ = make_tiny_llama()
        windows = windows_for(model, n=8, seq_len=32)
        prune_sequential_(model, LLAMA, windows, PruneConfig(method, sparsity=0.5), progress=False)  # type: ignore[arg-type]
        with torch.no_grad():
            results[method] = float(model(windows, labels=windows).loss)
    assert results["sparsegpt"] < results["magnitude"]


def test_indivisible_pattern_is_refused_before_any_change() -> None:
    model, _ = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeonError, match="not a multiple of the 2:3 block size 3"):
        prune_sequential_(model, LLAMA, None, PruneConfig("magnitude", pattern=NMPattern(1, 3)), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_counts_zeros_in_saved_tensors_and_reloads(tmp_path: Path) -> None:
    model, tokenizer = make_tiny_llama()
    report = prune_sequential_(model, LLAMA, None, PruneConfig("magnitude", pattern=NMPattern(2, 4)), progress=False)
    out = tmp_path / "pruned"
    names = list(LLAMA.decoder_linears(model))
    written = save_checkpoint(model, tokenizer, out, report.to_dict(), names)
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert on_disk["saved_sparsity"] == written["saved_sparsity"] == pytest.approx(0.5)
    assert on_disk["saved_zeros"] == sum(v["zeros"] for v in report.layers.values())
    reloaded = load_model(out)
    ids = windows_for(model, n=1)
    torch.testing.assert_close(reloaded.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(SurgeonError, match="not empty"):
        save_checkpoint(model, tokenizer, out, report.to_dict(), names)


def test_interrupted_write_leaves_target_untouched(tmp_path: Path) -> None:
    out = tmp_path / "target"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def fill(tmp: Path) -> None:
        (tmp / "half.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, force=True, fill=fill)
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
    assert (out / "keep.txt").read_text() == "old"
