"""``--layout nemotron-nas`` (export/nemotron_nas.py, base/nemotron_nas.py): the written config and weights, the refusals.

The model: the tiny Llama of tests/families.py (6 query heads in 2 KV groups of 3, head_dim 8; MLP 300
here), masked by :data:`NAS_MASK` so that, shrunk, its layers have different MLP widths and KV-head
counts but the same 2 query heads; layer 2's MLP and layer 3's attention are zeroed whole, so they add
nothing. The default layout writes it per-layer; ``shrink --layout nemotron-nas`` on that checkpoint
writes :data:`NAS_BLOCKS`. vLLM serving it with nothing of ours installed: tests/test_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from base import nemotron_nas as nas_module
from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import MODELING_FILE, NAS_CONFIG_FILE, REPORT_FILE
from base.loading import load_model
from base.surgery import LayerPlan, RemovalPlan, zero_groups_
from export.compress import silent_blocks
from export.nemotron_nas import ffn_entry, ffn_mult_width
from export.pruned import ShrinkConfig, shrink_and_save
from tests.cli_runner import run_cli
from tests.conftest import make_tokenizer
from tests.families import make_model
from tests.test_bad_input import one_line_error

NAS_MASK = RemovalPlan({
    0: LayerPlan.of(channels=range(5), heads=[1, 2, 4, 5]),  # 295 channels; 2 heads in 2 KV groups
    1: LayerPlan.of(channels=range(9), kv_groups=[1], heads=[0]),  # 291; 2 heads in 1 KV group
    2: LayerPlan.of(heads=[0, 1, 3, 4]),  # 2 heads in 2 KV groups; the whole MLP zeroed (silent_layers)
    3: LayerPlan.of(channels=range(44)),  # 256 = DeciLM's ffn_mult 8.0 at hidden 48; the whole attention zeroed
})
SILENT = {2: "mlp", 3: "attention"}
NAS_BLOCKS = [
    {"attention": {"no_op": False, "n_heads_in_group": 1}, "ffn": {"no_op": False, "intermediate_size": 295}},
    {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": False, "intermediate_size": 291}},
    {"attention": {"no_op": False, "n_heads_in_group": 1}, "ffn": {"no_op": True}},
    {"attention": {"no_op": True}, "ffn": {"no_op": False, "ffn_mult": 8.0}},
]
NO_OP_TENSORS = {"model.layers.2.mlp.", "model.layers.2.post_attention_layernorm.", "model.layers.3.self_attn.",
                 "model.layers.3.input_layernorm."}


def masked(family: str = "llama", mask: RemovalPlan = NAS_MASK, silent: dict[int, str] = SILENT,
           **overrides) -> torch.nn.Module:
    """The tiny model of ``family`` (float32, 4 layers, MLP 300) with ``mask``'s groups and ``silent``'s blocks zeroed."""
    model = make_model(family, dtype=torch.float32, layers=4, intermediate_size=300, **overrides)
    adapter = get_adapter(family)
    zero_groups_(model, adapter, mask)
    with torch.no_grad():
        for i, block in silent.items():
            layer = adapter.decoder_layers(model)[i]
            names = adapter.channel_cols if block == "mlp" else adapter.head_cols
            for name in names:
                adapter.linear(layer, name).weight.zero_()
    return model


def write_nas(root: Path, tok: object, **overrides) -> tuple[Path, Path]:
    """The masked model shrunk to a per-layer checkpoint, and that checkpoint written in the Nemotron-NAS layout."""
    per_layer, nas = root / "per-layer", root / "nemotron-nas"
    shrink_and_save(masked(vocab_size=len(tok), **overrides), tok, get_adapter("llama"), per_layer,  # type: ignore[arg-type]
                    ShrinkConfig(check_tokens=8))
    lm = load_model(per_layer)
    shrink_and_save(lm.model, lm.tokenizer, lm.adapter, nas, ShrinkConfig(check_tokens=8, layout="nemotron-nas"))
    return per_layer, nas


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_nas(tmp_path_factory.mktemp("nas"), make_tokenizer(vocab_size=96))


def test_config_and_weights(written: tuple[Path, Path]) -> None:
    """The config describes the per-layer checkpoint's shapes as block configs; the weights are its
    weights, bit for bit, without the tensors of the no_op blocks; our config class is beside them."""
    per_layer, nas = written
    source = json.loads((per_layer / "config.json").read_text())
    assert source["layer_num_attention_heads"] == [2, 2, 2, 1] and source["layer_num_key_value_heads"] == [2, 1, 2, 1]
    assert source["layer_intermediate_sizes"] == [295, 291, 1, 256]  # the silent MLP kept as one zero channel
    config = json.loads((nas / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_nemotron_nas.NemotronNasConfig"}
    assert config["block_configs"] == NAS_BLOCKS
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 8)
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"]["rope_type"] == "llama3"  # 4.x's keys too
    assert not {"per_layer_config", "surgeon_format_version", "layer_intermediate_sizes"} & set(config)
    assert (nas / NAS_CONFIG_FILE).read_bytes() == Path(nas_module.__file__).read_bytes()
    assert not (nas / MODELING_FILE).exists()
    theirs, ours = tensors(nas), tensors(per_layer)
    assert set(theirs) == {n for n in ours if not n.startswith(tuple(NO_OP_TENSORS))}
    assert len(ours) - len(theirs) == 9  # gate, up, down, post-attention norm; q, k, v, o and the input norm
    assert all(torch.equal(theirs[n], ours[n]) for n in theirs)
    report = json.loads((nas / REPORT_FILE).read_text())
    assert report["checkpoint_format"] == "nemotron-nas" and report["shrink"]["max_logit_change"] == 0.0
    assert report["nemotron_nas"]["no_op_attention"] == [3] and report["nemotron_nas"]["no_op_ffn"] == [2]
    assert "Variable GQA" in report["nemotron_nas"]["sglang"] and "layers [0, 1]" in report["nemotron_nas"]["sglang"]


def test_config_reads_as_vllm_reads_it(written: tuple[Path, Path]) -> None:
    """Loaded as vLLM loads it (``trust_remote_code``: the shipped file), each layer's sizes come out as
    vLLM's ``nemotron_nas.py`` computes them: KV heads = heads // n_heads_in_group, the MLP width from
    ``ffn_mult`` when the attribute exists, else ``intermediate_size``."""
    from transformers import AutoConfig

    per_layer, nas = written
    config = AutoConfig.from_pretrained(nas, trust_remote_code=True)
    assert type(config).__name__ == "NemotronNasConfig" and type(config).__module__.startswith("transformers_modules")
    source = json.loads((per_layer / "config.json").read_text())
    for i, block in enumerate(config.block_configs):
        if not block.attention.no_op:
            assert config.num_attention_heads // block.attention.n_heads_in_group == source["layer_num_key_value_heads"][i]
            assert config.num_attention_heads == source["layer_num_attention_heads"][i]
        if not block.ffn.no_op:
            width = (ffn_mult_width(block.ffn.ffn_mult, config.hidden_size) if hasattr(block.ffn, "ffn_mult")
                     else block.ffn.intermediate_size)
            assert width == source["layer_intermediate_sizes"][i]
    assert [hasattr(b.ffn, "ffn_mult") for b in config.block_configs] == [False, False, False, True]
    assert json.loads(config.to_json_string())["block_configs"] == NAS_BLOCKS


def test_config_class_takes_heads_that_do_not_divide_the_hidden_size() -> None:
    """5 query heads of 32 in a hidden size of 48: transformers 5's LlamaConfig alone refuses it; vLLM
    reads the explicit head_dim."""
    config = nas_module.NemotronNasConfig(hidden_size=48, num_attention_heads=5, head_dim=32, num_key_value_heads=5,
                                          block_configs=[{"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 7}}])
    assert (config.num_attention_heads, config.head_dim, config.num_key_value_heads) == (5, 32, 5)
    assert config.block_configs[0].attention.no_op is False and config.block_configs[0].ffn.intermediate_size == 7


@pytest.mark.parametrize("hidden", [48, 576, 4096])
def test_ffn_entry(hidden: int) -> None:
    """Multiples of 256 as DeciLM's ffn_mult, which its formula gives back exactly; other widths as intermediate_size."""
    for width in range(256, 16 * 1024 + 1, 256):
        entry = ffn_entry(width, hidden)
        assert set(entry) == {"ffn_mult"} and ffn_mult_width(entry["ffn_mult"], hidden) == width
    for width in (1, 40, 255, 257, 1000):
        assert ffn_entry(width, hidden) == {"intermediate_size": width}
    assert ffn_entry(1536, 576) == {"ffn_mult": 4.0}  # SmolLM2's width


def test_silent_blocks_need_no_output_bias() -> None:
    """A zeroed MLP with a non-zero down bias still adds its bias: not silent (no no_op)."""
    model = masked(mlp_bias=True)
    assert silent_blocks(model, get_adapter("llama"))[2:] == [(False, False), (True, False)]
    with torch.no_grad():
        get_adapter("llama").decoder_layers(model)[2].mlp.down_proj.bias.zero_()
    assert silent_blocks(model, get_adapter("llama"))[2] == (False, True)


@pytest.mark.parametrize("case, message", [
    ("heads", "--layout nemotron-nas: layer 1 has 4 query heads and layer 0 6; Nemotron-NAS gives every layer the "
              "same query heads (KV heads and MLP widths may differ per layer): use the default layout, which our "
              "vLLM plugin serves (docs/vllm.md)"),
    ("first", "--layout nemotron-nas: layer 0 has an MLP but no attention, and no layer before it computes anything; "
              "vLLM's and SGLang's Nemotron-NAS code needs attention there: use the default layout, which our vLLM "
              "plugin serves (docs/vllm.md)"),
    ("qwen2", "--layout nemotron-nas writes Llama and Mistral models (DeciLM is a Llama decoder), not qwen2: use the "
              "default layout"),
    ("mistral", "--layout nemotron-nas: this mistral attends through a sliding window of 4 tokens, which Nemotron-NAS "
                "has no field for: use the default layout, which our vLLM plugin serves (docs/vllm.md)"),
])
def test_refusals_are_one_line_and_write_nothing(case: str, message: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``shrink --layout nemotron-nas`` on a masked model that does not fit: one line naming the first layer
    (or the family) that does not fit, exit 2, no output directory."""
    tok = make_tokenizer(vocab_size=96)
    family = case if case in ("qwen2", "mistral") else "llama"
    mask = RemovalPlan({1: LayerPlan.of(heads=[0, 3])}) if case == "heads" else RemovalPlan()
    model = masked(family, mask, {0: "attention"} if case == "first" else {}, vocab_size=len(tok))
    source = tmp_path / "masked"
    model.save_pretrained(source)
    tok.save_pretrained(source)
    capsys.readouterr()  # the writing's progress bars
    out = tmp_path / "nas"
    done = run_cli("shrink", str(source), "--out", str(out), "--layout", "nemotron-nas", "--quiet")
    assert one_line_error(done) == f"error: {message}"
    assert not out.exists()


def test_mistral_without_window_and_other_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A Mistral without a sliding window is a Llama decoder: written. Two layouts at once, an unknown one, or
    a layout for a checkpoint that keeps its shapes: one line each."""
    import surgeon_export.api as api

    tok = make_tokenizer(vocab_size=96)
    model = masked("mistral", sliding_window=None, vocab_size=len(tok))
    report = shrink_and_save(model, tok, get_adapter("mistral"), tmp_path / "m", ShrinkConfig(layout="nemotron-nas"))
    assert report["model_type"] == "nemotron-nas" and report["shrink"]["max_logit_change"] < 1e-5
    assert json.loads((tmp_path / "m" / "config.json").read_text())["block_configs"] == NAS_BLOCKS
    capsys.readouterr()
    done = run_cli("shrink", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--layout", "nas")
    assert one_line_error(done) == "error: --layout must be one of default, nemotron-nas, got 'nas'"
    with pytest.raises(SurgeonError, match="^--uniform writes the stock architecture and --layout nemotron-nas another"):
        ShrinkConfig(uniform=True, layout="nemotron-nas")
    with pytest.raises(SurgeonError, match="lays out a structured run's smaller checkpoint"):
        api.save(api.LoadedModel.__new__(api.LoadedModel), tmp_path / "y", None, layout="nemotron-nas")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_structured_run_saved_in_the_layout(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """``api.save(..., layout="nemotron-nas")``: a structured run's smaller checkpoint in the layout, its
    blocks the sizes the run kept (Wanda, uniform allocation: MLP channels only)."""
    import surgeon_export.api as api

    lm = load_model(tiny_llama_dir)
    report = api.prune(lm, api.build_config("wanda", structured=0.8, allocation="uniform"), calib_text=text_file,
                       calib_samples=8, seq_len=16)
    written = api.save(lm, tmp_path / "nas", report, layout="nemotron-nas")
    assert written["checkpoint_format"] == "nemotron-nas" and written["shrink"]["layout"] == "nemotron-nas"
    config = json.loads((tmp_path / "nas" / "config.json").read_text())
    widths = [layer["intermediate_size"] for layer in written["layers"]]
    assert widths[0] < 64 and config["num_attention_heads"] == 4
    assert config["block_configs"] == [{"attention": {"no_op": False, "n_heads_in_group": 2},
                                        "ffn": {"no_op": False, "intermediate_size": w}} for w in widths]
