"""BOS follows the tokenizer's convention: windows lead with BOS only where tokenizer("x") starts with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from base.data import leading_bos, random_windows, tokenize
from surgeon_export import api
from tests.conftest import make_tiny_llama, make_tokenizer

T = 16


def bos_tokenizer():
    """The tiny tokenizer with a post-processor that puts <s> before every text (Gemma's convention)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer()
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def bos_dir(tmp_path: Path) -> Path:
    model, _ = make_tiny_llama()
    out = tmp_path / "bos-llama"
    model.save_pretrained(out)
    bos_tokenizer().save_pretrained(out)
    return out


def reference_ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_plain_tokenizer_windows_have_no_bos(tiny_llama_dir: Path, text_file: Path) -> None:
    lm = api.load(tiny_llama_dir)
    assert leading_bos(lm.tokenizer) is None
    ids = tokenize(lm.tokenizer, text_file.read_text())
    ppl, _ = api.evaluate(lm, text=text_file, seq_len=T, windows=3)
    assert ppl.bos is False and ppl.to_dict()["bos"] is False
    assert ppl.perplexity == pytest.approx(reference_ppl(lm.model, ids[: 3 * T].reshape(3, T)), rel=1e-6)
    calib = api.calibrate(lm, 4, seq_len=T, text=text_file)
    assert calib.bos is None and torch.equal(calib.ids, random_windows(ids, 4, T, 0))
    report = api.prune(lm, api.build_config("wanda", sparsity=0.5), calibration=calib)
    assert report.to_dict()["bos"] is False


def test_bos_tokenizer_windows_lead_with_bos(bos_dir: Path, text_file: Path, tmp_path: Path) -> None:
    lm = api.load(bos_dir)
    bos = lm.tokenizer.bos_token_id
    assert lm.tokenizer("x")["input_ids"][0] == bos and leading_bos(lm.tokenizer) == bos
    ids = tokenize(lm.tokenizer, text_file.read_text())  # the text itself: no special tokens
    assert int(ids[0]) != bos

    ppl, _ = api.evaluate(lm, text=text_file, seq_len=T, windows=3)
    expected = torch.cat([torch.full((3, 1), bos), ids[: 3 * (T - 1)].reshape(3, T - 1)], dim=1)  # [BOS] + 15
    assert ppl.bos is True and ppl.tokens == 3 * (T - 1) and ppl.seq_len == T
    assert ppl.perplexity == pytest.approx(reference_ppl(lm.model, expected), rel=1e-6)

    calib = api.calibrate(lm, 4, seq_len=T, text=text_file, seed=3)
    assert calib.ids.shape == (4, T) and bool((calib.ids[:, 0] == bos).all())
    assert torch.equal(calib.ids[:, 1:], random_windows(ids, 4, T - 1, 3))

    report = api.prune(lm, api.build_config("wanda", sparsity=0.5), calibration=calib)
    written = api.save(lm, tmp_path / "pruned", report)
    assert written["bos"] is True


def test_statistics_leave_out_the_leading_position_only_when_asked() -> None:
    """SecondMoment of ``[B, T, d]`` inside leading_positions_left_out(1) is that of ``x[:, 1:]``, exactly;
    outside it, of every position; 2-D inputs (no window axis) are never cut."""
    from surgeon.curvature.activations import SecondMoment, leading_positions_left_out

    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole, left_out, flat = SecondMoment(5), SecondMoment(5), SecondMoment(5)
    whole.update(x)
    with leading_positions_left_out(1):
        left_out.update(x)
        flat.update(x.reshape(-1, 5))
    rest = x[:, 1:].reshape(-1, 5)
    assert torch.equal(left_out.finalize(), rest.T @ rest / rest.shape[0]) and left_out.count == 18
    assert whole.count == 21 and flat.count == 21


def test_bos_statistics_exclude_leaves_the_bos_position_out(bos_dir: Path, text_file: Path) -> None:
    """``bos_statistics="exclude"`` leaves BOS out of the statistics of BOS-first windows: a BOS embedding turned
    into one massive feature (as trained models have at the first position; it survives the norm as one channel of
    ~sqrt(hidden)) then leaves layer 0's q/k/v pruned exactly as before (their inputs at the other positions do not
    see BOS); with the default, "include", it moves them. The report records the choice."""

    def pruned(massive: bool, bos_statistics: str) -> dict[str, torch.Tensor]:
        lm = api.load(bos_dir)
        bos = lm.tokenizer.bos_token_id
        if massive:
            with torch.no_grad():
                row = lm.model.get_input_embeddings().weight[bos]
                row.zero_()
                row[0] = 1000.0
        calib = api.calibrate(lm, 4, seq_len=T, text=text_file)
        report = api.prune(lm, api.build_config("wanda", sparsity=0.5), calibration=calib, bos_statistics=bos_statistics)
        assert report.to_dict()["bos_statistics"] == bos_statistics
        layer = lm.adapter.decoder_layers(lm.model)[0]
        return {n: lm.adapter.linear(layer, n).weight == 0 for n in lm.adapter.kv_rows + lm.adapter.head_rows}

    plain = pruned(False, "exclude")
    for name, mask in pruned(True, "exclude").items():
        assert torch.equal(mask, plain[name]), name
    counted, plain_counted = pruned(True, "include"), pruned(False, "include")
    assert any(not torch.equal(counted[n], plain_counted[n]) for n in counted)
    with pytest.raises(api.SurgeonError, match="--bos-statistics must be one of include, exclude"):
        api.prune(api.load(bos_dir), api.build_config("wanda", sparsity=0.5), calib_samples=2, seq_len=T,
                  calib_text=text_file, bos_statistics="drop")


def test_windows_without_bos_ignore_the_choice(tiny_llama_dir: Path, text_file: Path) -> None:
    """The default model's form (no BOS): both settings give the same tensors, and no bos_statistics is recorded."""
    results = []
    for choice in ("include", "exclude"):
        lm = api.load(tiny_llama_dir)
        report = api.prune(lm, api.build_config("sparsegpt", sparsity=0.5), calib_samples=4, seq_len=T,
                           calib_text=text_file, bos_statistics=choice)
        assert "bos_statistics" not in report.to_dict()
        results.append(lm.model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
