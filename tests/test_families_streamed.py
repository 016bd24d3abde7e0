"""Every method, streamed and whole-model, on tiny models carrying every feature of each family's real
configs (tests/families.py: sliding and full attention layers, windows longer than the sliding window,
two RoPE bases, soft-capping, scaled embeddings, biases, learned positions, BOS-first tokenizers).

Issue #29: streamed LLM Surgeon diverged from whole-model mode on a real Gemma3 model because every
layer ran with layer 0's mask and rotary embeddings. The layer-at-a-time path must reproduce the
model's own forward pass exactly, layer type by layer type.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from base.adapters import get_adapter
from base.loading import load_model
from surgeon.calibrate import capture_layer_inputs, final_hidden, run_layer
from surgeon_export import api
from tests.conftest import CORPUS, tensors
from tests.families import BOS_FAMILIES, FAMILIES, SLIDING_WINDOW, make_model, save_family

T = 16  # calibration window: longer than the sliding window
assert T > 2 * SLIDING_WINDOW


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_the_models_forward(family: str) -> None:
    """Layer 0's captured inputs run through every layer with each layer's own keyword arguments give the
    model's last hidden state exactly (float64), for every batch split."""
    model = make_model(family)
    adapter = get_adapter(model.config.model_type)
    ids = torch.randint(2, 96, (5, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    batches = capture_layer_inputs(model, adapter, ids, batch_size=2)
    assert [b.hidden.shape[0] for b in batches] == [2, 2, 1] and all(b.index == 0 for b in batches)
    for layer in adapter.decoder_layers(model):
        batches = run_layer(layer, batches)
    out = torch.cat([final_hidden(model, adapter, b.hidden) for b in batches])
    assert torch.equal(out, reference)


def test_layer_types_get_their_own_mask_and_rotary_embeddings() -> None:
    """Gemma3's sliding layers and its full-attention layer receive different masks and RoPE tables; layers
    of one type share the same tensors (captured once, not once per layer)."""
    model = make_model("gemma3_text")
    batch = capture_layer_inputs(model, get_adapter("gemma3_text"), torch.arange(2, 2 + T)[None], 1)[0]
    sliding, sliding2, full = batch.layer_kwargs
    assert sliding["position_embeddings"][0] is sliding2["position_embeddings"][0]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    masks = [kw["attention_mask"] for kw in (sliding, full)]
    assert not all(m is None for m in masks) and (masks[0] is None) != (masks[1] is None) or not torch.equal(*masks)


def run_both(family: str, tmp: Path, cfg: api.Config) -> tuple[dict, dict, dict, dict]:
    src = save_family(family, tmp / "src")
    text = tmp / "calib.txt"
    text.write_text(CORPUS * 40)
    calib = dict(calib_samples=4, seq_len=T, calib_text=text)
    lm = load_model(src)
    report = api.prune(lm, cfg, **calib).to_dict()
    whole = lm.model.state_dict()
    written = api.prune_streamed(src, cfg, tmp / "streamed", check=True, **calib)
    check = written["layerwise_check"]  # the guard of issue #29: on here, exact
    assert check["ok"] and check["max_relative_difference"] == 0.0 and check["windows"] == 2
    return whole, report, tensors(tmp / "streamed"), written


EVERY_FAMILY = {  # the flagship and a baseline with a full statistics matrix, in every family
    "surgeon structured global": dict(method="surgeon", structured=0.7, shots=2),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
}
LAYER_TYPES = {  # the rest where layers differ in type (sliding and full attention, local and global RoPE)
    "surgeon structured uniform": dict(method="surgeon", structured=0.8, allocation="uniform"),
    "surgeon 2:4": dict(method="surgeon", pattern="2:4"),
    "wanda structured": dict(method="wanda", structured=0.8),
}
CASES = [pytest.param(f, k, id=f"{name}-{f}") for name, k in EVERY_FAMILY.items() for f in FAMILIES] + \
        [pytest.param(f, k, id=f"{name}-{f}") for name, k in LAYER_TYPES.items() for f in ("qwen2", "gemma2", "gemma3_text")]


@pytest.mark.parametrize("family, kwargs", CASES)
def test_streamed_equals_whole_model_in_every_family(family: str, kwargs: dict, tmp_path: Path) -> None:
    kwargs = dict(kwargs)
    cfg = api.build_config(kwargs.pop("method"), **kwargs)
    whole, report, streamed, written = run_both(family, tmp_path, cfg)
    for key, value in streamed.items():  # bit-identical: the same statistics, costs, selection and updates
        assert torch.equal(value, whole[key].to(value.dtype)), key
    assert written["layers"] == report["layers"] and written.get("removal") == report.get("removal")
    assert written["bos"] is (family in BOS_FAMILIES)
    if getattr(cfg, "structured", None) is not None:
        assert written["removal"]  # groups were removed, and the same ones


def test_the_layerwise_check_names_the_first_layer_that_departs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What the guard reports when the layer-at-a-time path is wrong: the bug of issue #29 (every layer given
    layer 0's mask and rotary embeddings) put back by hand makes Gemma3's full-attention layer (the last)
    depart, and the warning names it."""
    import surgeon.calibrate as calibrate

    src = save_family("gemma3_text", tmp_path / "src")
    ids = torch.randint(2, 96, (2, T), generator=torch.Generator().manual_seed(1))
    assert api.check_layerwise(src, ids)["ok"]
    right = calibrate.capture_layer_inputs

    def layer_zero_for_all(*args, **kwargs):  # the old capture: layer 0's keyword arguments for every layer
        return [calibrate.LayerBatch(b.hidden, (b.layer_kwargs[0],) * len(b.layer_kwargs)) for b in right(*args, **kwargs)]

    calibrate.capture_layer_inputs = layer_zero_for_all
    try:
        with caplog.at_level("WARNING"):
            result = api.check_layerwise(src, ids)
    finally:
        calibrate.capture_layer_inputs = right
    assert not result["ok"] and result["first_layer_over"] == 2 and result["max_relative_difference"] > 1e-3
    assert "decoder layer 2" in caplog.text
