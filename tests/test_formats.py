"""Checkpoints every client takes as they are: stock config when the layers are equal, transformers'
per_layer_config beside ours, keys transformers 4.x reads, AutoTokenizer without a prompt, shrink
--uniform from a per-layer checkpoint, model cards, pack writing our own modeling file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import MODELING_FILE
from base.loading import load_model
from base.surgery import LayerPlan, RemovalPlan, layer_shapes, zero_groups_
from export.card import CARD_FILE, lineage, read_front_matter, shape_runs
from export.portable import legacy_rope_keys, portable_config
from export.pruned import ShrinkConfig, per_layer_config, shrink_and_save
from tests.cli_runner import run_cli
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.test_surgery import IDS, make_model, random_plan

NO_PROMPT = "Do you wish to run the custom code"


def _equal_plan(model: torch.nn.Module, adapter, channels: int) -> RemovalPlan:
    """The same number of MLP channels (different ones) removed from every layer: equal layers afterwards."""
    shapes = layer_shapes(model, adapter)
    return RemovalPlan({i: LayerPlan.of(range(i, i + channels)) for i in range(len(shapes))})


@pytest.fixture(scope="module")
def equal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 10 MLP channels zeroed in every layer, shrunk with default settings (no --uniform)."""
    model, tok = make_tiny_llama()
    adapter = get_adapter("llama")
    zero_groups_(model, adapter, _equal_plan(model, adapter, 10))
    out = tmp_path_factory.mktemp("equal") / "small"
    report = {"model": "tiny", "method": "surgeon", "config": {"method": "surgeon", "structured": 0.8},
              "perplexity": {"perplexity": 45.37, "windows": 64}}
    shrink_and_save(model, tok, adapter, out, ShrinkConfig(), report=report)
    return out


@pytest.fixture(scope="module")
def per_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with different sizes in every layer (the per-layer format), with default RoPE (SmolLM2's form:
    the keys below are those of an unscaled RoPE; tests/families.py's llama carries Llama 3 scaling)."""
    tok = make_tokenizer()
    model = make_model("llama", dtype=torch.float32, vocab_size=len(tok), rope_scaling=None, rope_theta=10000.0)
    adapter = get_adapter("llama")
    zero_groups_(model, adapter, random_plan(layer_shapes(model, adapter), seed=2))
    out = tmp_path_factory.mktemp("perlayer") / "small"
    shrink_and_save(model, tok, adapter, out, ShrinkConfig())
    return out


# 1. Stock architecture when every layer is equal --------------------------------------------------------


def test_equal_layers_are_written_as_the_stock_architecture(equal_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    config = json.loads((equal_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["intermediate_size"] == 54 and "auto_map" not in config
    assert not any(k.startswith("layer_") or k in ("per_layer_config", "surgeon_format_version") for k in config)
    assert not (equal_dir / MODELING_FILE).exists()
    report = json.loads((equal_dir / "surgeon_report.json").read_text())
    assert report["checkpoint_format"] == "uniform"
    plain = AutoModelForCausalLM.from_pretrained(equal_dir, trust_remote_code=False, dtype=torch.float32).eval()
    assert type(plain) is LlamaForCausalLM
    ours = load_model(equal_dir)
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, ours.model(IDS).logits)


def test_stock_logits_equal_our_per_layer_class_exactly(equal_dir: Path) -> None:
    """The same tensors in our per-layer class (what the main job wrote before) give bit-identical logits."""
    from base.modeling import SurgeonLlamaForCausalLM

    lm = load_model(equal_dir)
    per_layer = SurgeonLlamaForCausalLM(per_layer_config(lm.model, lm.adapter)).eval()
    per_layer.load_state_dict(lm.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(per_layer(IDS).logits, lm.model(IDS).logits)


def test_per_layer_config_is_transformers_format(per_layer_dir: Path) -> None:
    from transformers import PreTrainedConfig

    config = json.loads((per_layer_dir / "config.json").read_text())
    assert config["model_type"] == "surgeon_llama"
    mapping = config["per_layer_config"]
    n = config["num_hidden_layers"]
    assert sorted(mapping) == [str(i).zfill(len(str(n - 1))) for i in range(n)]
    for i in range(n):
        assert mapping[sorted(mapping)[i]] == {"intermediate_size": config["layer_intermediate_sizes"][i],
                                               "num_attention_heads": config["layer_num_attention_heads"][i],
                                               "num_key_value_heads": config["layer_num_key_value_heads"][i]}
    # transformers' own heterogeneous-config code reads the mapping as the same per-layer sizes (the generic
    # PreTrainedConfig: 5.23's LlamaConfig validation reads the global head count, so it refuses per-layer heads)
    stock = {k: v for k, v in config.items() if not k.startswith("layer_") and k not in ("auto_map", "model_type")}
    hetero = PreTrainedConfig(**stock)
    assert hetero.is_heterogeneous
    assert [hetero.per_layer_config[i].intermediate_size for i in range(n)] == config["layer_intermediate_sizes"]
    assert [hetero.per_layer_config[i].num_key_value_heads for i in range(n)] == config["layer_num_key_value_heads"]


def test_per_layer_config_disagreeing_with_our_lists_is_refused(per_layer_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(per_layer_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    first = sorted(config["per_layer_config"])[0]
    config["per_layer_config"][first]["intermediate_size"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SurgeonError, match="per_layer_config disagrees"):
        load_model(bad)


# 2. Keys both transformers generations read --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["equal", "per_layer"])
def test_rope_theta_and_tokenizer_class_for_transformers_4(kind: str, equal_dir: Path, per_layer_dir: Path) -> None:
    from transformers import AutoConfig, PreTrainedTokenizerFast

    import surgeon  # noqa: F401  (registers the per-layer model types)

    directory = equal_dir if kind == "equal" else per_layer_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert "rope_scaling" not in config  # default RoPE: nothing to scale
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    parsed = AutoConfig.from_pretrained(directory)
    assert parsed.rope_parameters == config["rope_parameters"]  # 5.x reads the same values as before
    tok = load_model(directory).tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "The quick brown fox, 0123!"
    assert tok(text)["input_ids"] == make_tokenizer()(text)["input_ids"]


def test_default_model_theta_is_written_at_the_top_level() -> None:
    """SmolLM2's 100,000 (4.57 would silently use 10,000 without the top-level key)."""
    config = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert portable_config(config)["rope_theta"] == 100000.0
    with pytest.raises(ValueError, match="disagrees"):
        portable_config({**config, "rope_theta": 10000.0})


def test_legacy_rope_keys_for_scaled_and_per_attention_type_configs() -> None:
    llama3 = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}}
    keys = legacy_rope_keys(llama3)
    assert keys["rope_theta"] == 500000.0
    assert keys["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    gemma3 = {"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}}
    assert legacy_rope_keys(gemma3) == {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}


# 3. AutoTokenizer without a prompt ----------------------------------------------------------------------

TOKENIZER_SCRIPT = r'''
import sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(type(tok).__name__, tok("hello world")["input_ids"])
'''


def _tokenizer_in_subprocess(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "-I", "-c", TOKENIZER_SCRIPT, str(directory)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)


def test_autotokenizer_on_a_stock_checkpoint_never_prompts(equal_dir: Path, tmp_path: Path) -> None:
    done = _tokenizer_in_subprocess(equal_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert NO_PROMPT not in done.stdout + done.stderr
    assert done.stdout.split()[0] in ("TokenizersBackend", "PreTrainedTokenizerFast")


# 4. shrink --uniform from a per-layer checkpoint ----------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_shrink_uniform_from_per_layer_checkpoint(family: str, tmp_path: Path) -> None:
    """Every layer padded to a common size with zero groups: stock config, same logits (float-order bound)."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = make_model(family, dtype=torch.float32, vocab_size=len(tok))
    adapter = get_adapter(family)
    zero_groups_(model, adapter, random_plan(layer_shapes(model, adapter), seed=2))
    shrink_and_save(model, tok, adapter, tmp_path / "per-layer", ShrinkConfig())
    lm = load_model(tmp_path / "per-layer")
    assert str(lm.model.config.model_type).startswith("surgeon_")
    shapes = layer_shapes(lm.model, lm.adapter)
    assert len(set(shapes)) > 1
    # what used to fail: the widest layer keeps more channels than the narrowest layer has
    assert max(s.intermediate_size for s in shapes) > min(s.intermediate_size for s in shapes)
    with torch.no_grad():
        before = lm.model(IDS).logits
    report = shrink_and_save(lm.model, lm.tokenizer, lm.adapter, tmp_path / "uniform", ShrinkConfig(uniform=True))
    assert report["checkpoint_format"] == "uniform"
    config = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert not (tmp_path / "uniform" / MODELING_FILE).exists()
    widths = {x["intermediate_size"] for x in report["layers"]}
    assert widths == {max(s.intermediate_size for s in shapes)}  # the widest layer's width, no wider
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", trust_remote_code=False, dtype=torch.float32)
    assert type(plain).__module__.startswith("transformers.models.")
    with torch.no_grad():
        after = plain.eval()(IDS).logits
    # Zeros added to sums: only the float summation order can change (bound: 1e-6 of the logit scale).
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6 * float(before.abs().max()))
    assert report["shrink"]["max_logit_change"] <= 1e-6 * float(before.abs().max())


def test_shrink_uniform_cli_from_per_layer_checkpoint(per_layer_dir: Path, tmp_path: Path) -> None:
    done = run_cli("shrink", str(per_layer_dir), "--uniform", "--out", str(tmp_path / "u"), "--json", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)
    assert payload["checkpoint_format"] == "uniform"
    assert json.loads((tmp_path / "u" / "config.json").read_text())["model_type"] == "llama"


# 5. Model cards ------------------------------------------------------------------------------------------


def test_card_beside_a_shrunk_checkpoint(equal_dir: Path) -> None:
    meta = read_front_matter(equal_dir / CARD_FILE)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"surgeon-export", "pruned", "surgeon"} <= set(meta["tags"])
    assert "base_model" not in meta  # "tiny" is no Hub model: nothing is made up
    text = (equal_dir / CARD_FILE).read_text()
    assert "method: surgeon, structured 0.8" in text
    assert "89.58% of the decoder-linear weights kept (16,512 of 18,432)" in text
    assert "layers 0-1: MLP width 54, 4 query heads, 2 KV heads" in text
    assert "perplexity 45.37 (WikiText-2 test, 64 windows" in text
    assert "## Command" in text


def test_card_lineage_and_shapes() -> None:
    assert lineage("SmolLM2-135M-Instruct (default, SmolLM2-135M-Instruct.Q4_1.gguf)", None) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    runs = shape_runs([{"intermediate_size": 5, "num_attention_heads": 4, "num_key_value_heads": 2}] * 2
                      + [{"intermediate_size": 3, "num_attention_heads": 2, "num_key_value_heads": 1}])
    assert runs == ["layers 0-1: MLP width 5, 4 query heads, 2 KV heads", "layer 2: MLP width 3, 2 query heads, 1 KV heads"]


def test_cards_beside_prune_pack_densify_onnx_gguf(tmp_path: Path) -> None:
    """Every CLI writer leaves a card; lineage is inherited from our own card along the chain."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    tok = make_tokenizer(vocab_size=320)  # real BPE merges, as llama.cpp's tokenizer needs
    torch.manual_seed(0)
    tiny_llama_dir = tmp_path / "tiny"
    LlamaForCausalLM(tiny_llama_config(len(tok))).save_pretrained(tiny_llama_dir)
    tok.save_pretrained(tiny_llama_dir)
    def cli(*args: str) -> None:
        done = run_cli(*args, "--quiet")
        assert done.returncode == 0, done.stderr[-2000:]

    pruned, packed, dense = tmp_path / "pruned", tmp_path / "packed", tmp_path / "dense"
    cli("prune", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4", "--out", str(pruned), "--no-eval")
    text = (pruned / CARD_FILE).read_text()
    assert "method: magnitude" in text and "surgeon-export prune" in text
    assert "50.00% of the decoder-linear weights non-zero" in text
    # pretend the source was a Hub model: the chain below must carry its base_model and license
    card = text.replace("---\n", "---\nbase_model: \"org/tiny\"\nlicense: \"mit\"\n", 1)
    (pruned / CARD_FILE).write_text(card)
    cli("pack", str(pruned), "--format", "2:4", "--out", str(packed))
    cli("densify", str(packed), "--out", str(dense))
    cli("onnx", str(pruned), "--out", str(tmp_path / "onnx"))
    cli("gguf", str(pruned), "--type", "f32", "--out", str(tmp_path / "m.gguf"))
    for path, library in ((packed / CARD_FILE, "surgeon-export"), (dense / CARD_FILE, "transformers"),
                          (tmp_path / "onnx" / CARD_FILE, "onnxruntime"), (tmp_path / "m.md", "gguf")):
        meta = read_front_matter(path)
        assert meta["library_name"] == library, path
        assert meta["base_model"] == "org/tiny" and meta["license"] == "mit", path
        assert "method: magnitude" in path.read_text(), path
    assert "2:4" in (packed / CARD_FILE).read_text() and "surgeon-export densify" in (packed / CARD_FILE).read_text()


# 6. pack writes our modeling file ------------------------------------------------------------------------


def test_pack_and_densify_write_our_modeling_file_never_the_source_copy(per_layer_dir: Path, tmp_path: Path) -> None:
    import shutil

    from base import modeling
    from export.sparse_checkpoint import PackConfig, densify, pack_checkpoint

    source = tmp_path / "source"
    shutil.copytree(per_layer_dir, source)
    (source / MODELING_FILE).write_text((source / MODELING_FILE).read_text() + "\nraise SystemExit('tampered')\n")
    pack_checkpoint(load_model(source), tmp_path / "packed", PackConfig("csr"))
    ours = Path(modeling.__file__).read_bytes()
    assert (tmp_path / "packed" / MODELING_FILE).read_bytes() == ours
    (tmp_path / "packed" / MODELING_FILE).write_text("raise SystemExit('tampered')\n")
    densify(tmp_path / "packed", tmp_path / "dense")
    assert (tmp_path / "dense" / MODELING_FILE).read_bytes() == ours


def test_main_job_speed_joins_the_card(equal_dir: Path, tmp_path: Path) -> None:
    """run() adds what the benchmark measured (here: the recorded main job) to the card and the report."""
    import shutil

    from export.card import add_measurements, benchmark_lines

    recorded = json.loads((Path(__file__).parents[1] / "benchmarks/results/main_job.json").read_text())["benchmark"]
    lines = benchmark_lines(recorded, "pruned")
    pruned = next(m for m in recorded["models"] if m["label"] == "pruned")
    ratios = {kind: next(iter(pruned["ratios"][kind].values()))["throughput"] for kind in ("prefill", "decode")}
    assert lines[0] == f"perplexity {pruned['perplexity']['perplexity']:.2f} (WikiText-2 test, 64 windows of 512 tokens)"
    assert any(line.startswith(f"prefill 1x128: {ratios['prefill']:.2f}x the throughput of dense") for line in lines)
    copy = tmp_path / "c"
    shutil.copytree(equal_dir, copy)
    add_measurements(copy, lines)
    text = (copy / CARD_FILE).read_text()
    assert "## Measured after writing" in text and f"decode b1: {ratios['decode']:.2f}x" in text
    assert read_front_matter(copy / CARD_FILE)["library_name"] == "transformers"
    assert json.loads((copy / "surgeon_report.json").read_text())["measured"] == lines


# 7. No missing code, and the tokenizer inputs generate() takes -------------------------------------------


def test_no_writer_leaves_an_auto_map_to_missing_code(per_layer_dir: Path, tmp_path: Path) -> None:
    """A source whose config and tokenizer config name custom code (in its directory, or in another
    repository): no output references code it does not hold; a per-layer output gets our own file."""
    from base import modeling
    from export.onnx import OnnxConfig, export_onnx
    from export.sparse_checkpoint import PackConfig, pack_checkpoint
    from surgeon_export import api

    source = tmp_path / "source"
    model, tok = make_tiny_llama()
    model.save_pretrained(source)
    tok.save_pretrained(source)
    for name, auto_map in (("config.json", {"AutoConfig": "configuration_custom.CustomConfig",
                                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                                            "AutoModel": "org/repo--modeling_custom.CustomModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})):
        data = json.loads((source / name).read_text())
        (source / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    (source / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    lm = load_model(source)
    cfg = api.build_config("magnitude", sparsity=0.5)
    api.save(lm, tmp_path / "masked", api.prune(lm, cfg))
    api.prune_streamed(source, cfg, tmp_path / "streamed")
    pack_checkpoint(load_model(tmp_path / "masked"), tmp_path / "packed", PackConfig("csr"))
    export_onnx(lm.model, lm.tokenizer, tmp_path / "onnx", OnnxConfig(verify=False))
    for out in ("masked", "streamed", "packed", "onnx"):
        for name in ("config.json", "tokenizer_config.json"):
            assert "auto_map" not in json.loads((tmp_path / out / name).read_text()), (out, name)
        assert not list((tmp_path / out).glob("*custom*")), out
    api.prune_streamed(per_layer_dir, cfg, tmp_path / "streamed-per-layer")  # keeps the per-layer config
    config = json.loads((tmp_path / "streamed-per-layer" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_surgeon.")
    assert (tmp_path / "streamed-per-layer" / MODELING_FILE).read_bytes() == Path(modeling.__file__).read_bytes()


def test_every_written_tokenizer_returns_only_what_generate_takes(equal_dir: Path, per_layer_dir: Path,
                                                                  tmp_path: Path) -> None:
    """transformers 4.57's generic fast tokenizer returns token_type_ids unless tokenizer_config.json
    names the inputs, and generate(**tokenizer(...)) then refuses them: every directory we write names them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import surgeon  # noqa: F401  (registers the per-layer model types)
    from export.onnx import OnnxConfig, export_onnx

    lm = load_model(equal_dir)
    export_onnx(lm.model, lm.tokenizer, tmp_path / "onnx", OnnxConfig(verify=False))
    for directory in (equal_dir, per_layer_dir, tmp_path / "onnx"):
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        assert tok_config["model_input_names"] == ["input_ids", "attention_mask"], directory
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        assert sorted(tok("The quick brown fox", return_tensors="pt")) == ["attention_mask", "input_ids"], directory
    for directory in (equal_dir, per_layer_dir):
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()
        enc = tok("The quick brown fox", return_tensors="pt")
        with torch.no_grad():
            by_kwargs = model.generate(**enc, max_new_tokens=4, do_sample=False)
            by_ids = model.generate(enc["input_ids"], max_new_tokens=4, do_sample=False)
        assert torch.equal(by_kwargs, by_ids) and by_kwargs.shape[1] == enc["input_ids"].shape[1] + 4
