"""Smaller checkpoints on disk: written once, loaded three ways with identical logits, bad input refused.

1. ``import surgeon`` then plain ``AutoModelForCausalLM.from_pretrained`` (and our ``load_model``);
2. transformers alone, ``trust_remote_code=True``, in a subprocess where surgeon cannot be imported;
3. ``--uniform``: the stock architecture, loaded by unmodified transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import MODELING_FILE
from base.loading import load_model
from base.surgery import LayerPlan, RemovalPlan, layer_shapes, shrink_, zero_groups_
from export.pruned import ShrinkConfig, save_pruned_checkpoint, shrink_and_save
from tests.conftest import make_tokenizer
from tests.test_surgery import IDS, make_model, random_plan

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "opt")

# Runs in a fresh interpreter (-I) with surgeon-export's packages blocked: transformers alone.
REMOTE_SCRIPT = r'''
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("base", "surgeon", "surgeon_export", "export", "runtime", "benchmarks", "tests"):
            raise ImportError(f"{name} must not be importable here")
        return None

sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ids = torch.tensor(json.loads(sys.argv[1]))
out, logits, classes = sys.argv[2], {}, {}
for spec in sys.argv[3:]:
    name, directory, remote = spec.split("=")
    trust = remote == "remote"
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
    with torch.no_grad():
        logits[name] = model(ids).logits.contiguous()
    classes[name] = type(model).__module__ + "." + type(model).__name__
save_file(logits, out)
ours = ("base", "surgeon", "surgeon_export", "export", "runtime", "benchmarks")
print(json.dumps({"classes": classes, "surgeon_modules": [m for m in sys.modules if m.split(".")[0] in ours]}))
'''


def _masked(family: str, tokenizer) -> tuple[torch.nn.Module, torch.Tensor]:
    model = make_model(family, dtype=torch.float32, vocab_size=len(tokenizer))
    adapter = get_adapter(model.config.model_type)
    zero_groups_(model, adapter, random_plan(layer_shapes(model, adapter), seed=2))
    with torch.no_grad():
        return model, model(IDS).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per family: a per-layer and a uniform checkpoint of the same masked model, and its logits."""
    root = tmp_path_factory.mktemp("shrunk")
    tokenizer = make_tokenizer()
    out: dict = {}
    for family in FAMILIES:
        model, reference = _masked(family, tokenizer)
        adapter = get_adapter(model.config.model_type)
        unpruned = root / f"{family}-unpruned"
        model.save_pretrained(unpruned)
        report = shrink_and_save(model, tokenizer, adapter, root / f"{family}-per-layer", ShrinkConfig())
        uniform_model, _ = _masked(family, tokenizer)
        uniform = shrink_and_save(uniform_model, tokenizer, adapter, root / f"{family}-uniform", ShrinkConfig(uniform=True))
        out[family] = {"reference": reference, "report": report, "uniform_report": uniform,
                       "per_layer": root / f"{family}-per-layer", "uniform": root / f"{family}-uniform",
                       "unpruned": unpruned}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_checkpoint_loads_with_import_surgeon(family: str, checkpoints: dict) -> None:
    from transformers import AutoModelForCausalLM

    ck = checkpoints[family]
    config = json.loads((ck["per_layer"] / "config.json").read_text())
    assert config["model_type"] == f"surgeon_{family}"
    assert config["surgeon_format_version"] == 1 and config["head_dim"] == 8
    sizes = config["layer_intermediate_sizes"]
    assert len(set(sizes)) == 3 and sizes == [s["intermediate_size"] for s in ck["report"]["layers"]]
    assert len(config["layer_num_attention_heads"]) == len(config["layer_num_key_value_heads"]) == 3
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_surgeon.Surgeon")
    assert ck["report"]["shrink"]["max_logit_change"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(ck["per_layer"], dtype=torch.float32)
    assert type(model).__module__ == "base.modeling"  # our registered class, not the directory's copy
    lm = load_model(ck["per_layer"])
    assert lm.adapter is get_adapter(family)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ck["reference"], rtol=0, atol=1e-5)
        torch.testing.assert_close(lm.model(IDS).logits, ck["reference"], rtol=0, atol=1e-5)
    assert [s.intermediate_size for s in layer_shapes(lm.model, lm.adapter)] == sizes


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_checkpoint_is_stock(family: str, checkpoints: dict) -> None:
    from transformers import AutoModelForCausalLM

    ck = checkpoints[family]
    config = json.loads((ck["uniform"] / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert "layer_intermediate_sizes" not in config
    assert not (ck["uniform"] / MODELING_FILE).exists()
    model = AutoModelForCausalLM.from_pretrained(ck["uniform"], dtype=torch.float32, trust_remote_code=False)
    assert type(model).__module__.startswith("transformers.models.")
    assert ck["uniform_report"]["checkpoint_format"] == "uniform"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ck["reference"], rtol=0, atol=1e-5)


def test_transformers_alone_loads_all_three_formats(checkpoints: dict, tmp_path: Path) -> None:
    modeling = (Path(__file__).parents[1] / "base" / "modeling.py").read_text()
    imports = [line for line in modeling.splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] in ("__future__", "copy", "dataclasses", "typing", "torch", "transformers")
               for line in imports), imports
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    specs = [f"{f}-per-layer={checkpoints[f]['per_layer']}=remote" for f in FAMILIES]
    specs += [f"{f}-uniform={checkpoints[f]['uniform']}=stock" for f in FAMILIES]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-I", str(script), json.dumps(IDS.tolist()), str(tmp_path / "logits.safetensors"), *specs],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["surgeon_modules"] == []
    logits = load_file(str(tmp_path / "logits.safetensors"))
    for family in FAMILIES:
        assert "modeling_surgeon" in info["classes"][f"{family}-per-layer"]  # the directory's own copy ran
        assert info["classes"][f"{family}-uniform"].startswith("transformers.models.")
        for kind in ("per-layer", "uniform"):
            torch.testing.assert_close(logits[f"{family}-{kind}"], checkpoints[family]["reference"], rtol=0, atol=1e-5)


def _linear_bytes(directory: Path, names: list[str]) -> int:
    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.removesuffix(".weight").removesuffix(".bias") in names:
                    shape = f.get_slice(key).get_shape()
                    total += int(torch.tensor(shape).prod()) * 4 if key.endswith(".weight") else 0
    return total


@pytest.mark.parametrize("family", ("llama", "opt"))
def test_bytes_on_disk_shrink_by_the_remaining_fraction(family: str, checkpoints: dict) -> None:
    ck = checkpoints[family]
    names = list(get_adapter(family).decoder_linears(make_model(family)).keys())
    before, after = _linear_bytes(ck["unpruned"], names), _linear_bytes(ck["per_layer"], names)
    shrink = ck["report"]["shrink"]
    assert after == ck["report"]["decoder_linear_bytes"]
    assert after / before == pytest.approx(shrink["remaining_fraction"], rel=1e-12) and after < 0.9 * before
    assert ck["report"]["bytes_on_disk"] < sum(f.stat().st_size for f in ck["unpruned"].glob("*.safetensors"))


@pytest.fixture
def bad_copy(checkpoints: dict, tmp_path: Path) -> Path:
    target = tmp_path / "bad"
    shutil.copytree(checkpoints["llama"]["per_layer"], target)
    return target


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    if any(k.startswith("layer_") for k in changes):  # our lists changed: drop the mapping that mirrors them
        config.pop("per_layer_config", None)
    path.write_text(json.dumps(config))


def test_tensor_disagreeing_with_config_is_named(bad_copy: Path) -> None:
    sizes = json.loads((bad_copy / "config.json").read_text())["layer_intermediate_sizes"]
    _edit_config(bad_copy, layer_intermediate_sizes=[sizes[0] + 1, *sizes[1:]])
    with pytest.raises(SurgeonError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* config\.json says"):
        load_model(bad_copy)


def test_missing_and_extra_tensors_are_named(bad_copy: Path) -> None:
    weights = bad_copy / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match=r"tensor model\.layers\.1\.mlp\.extra\.weight is not part of the model"):
        load_model(bad_copy)
    del tensors["model.layers.1.mlp.extra.weight"], tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match=r"tensor model\.layers\.2\.self_attn\.k_proj\.weight \[\d+, 48\] is missing"):
        load_model(bad_copy)


def test_missing_or_truncated_shard(bad_copy: Path) -> None:
    weights = bad_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-64])
    with pytest.raises(SurgeonError, match="corrupt or truncated safetensors file"):
        load_model(bad_copy)
    weights.rename(bad_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                             "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (bad_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeonError, match="shard model-00002-of-00002.safetensors listed in the index is missing"):
        load_model(bad_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"surgeon_format_version": 2}, "surgeon_format_version 2 is newer than this surgeon-export reads"),
        ({"surgeon_format_version": "1"}, "field surgeon_format_version missing or not an integer"),
        ({"layer_num_attention_heads": [3, 3]}, "layer_num_attention_heads must be a list of 3 sizes"),
        ({"layer_intermediate_sizes": [4, 0, 4]}, "layer_intermediate_sizes must hold positive integers"),
        ({"layer_num_key_value_heads": [4, 4, 4]}, "layer 0: .* query heads cannot be grouped over 4"),
    ],
)
def test_bad_config_fields_are_named(bad_copy: Path, changes: dict, message: str) -> None:
    _edit_config(bad_copy, **changes)
    with pytest.raises(SurgeonError, match=message):
        load_model(bad_copy)


def test_uniform_requires_equal_layers(tmp_path: Path) -> None:
    model = make_model("llama")
    adapter = get_adapter("llama")
    shrink_(model, adapter, RemovalPlan({0: LayerPlan.of(channels=[0])}))
    with pytest.raises(SurgeonError, match="--uniform needs the same sizes in every layer"):
        save_pruned_checkpoint(model, make_tokenizer(), adapter, tmp_path / "u", uniform=True)
    assert not (tmp_path / "u").exists()


def test_cli_shrink_align_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from surgeon_export.cli import app

    tokenizer = make_tokenizer()
    model, reference = _masked("llama", tokenizer)
    masked_dir = tmp_path / "masked"
    model.save_pretrained(masked_dir)
    tokenizer.save_pretrained(masked_dir)
    out = tmp_path / "small"
    done = CliRunner().invoke(app, ["shrink", str(masked_dir), "--out", str(out), "--align", "8", "--json", "--quiet"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert payload["max_logit_change"] < 1e-5 and payload["remaining_fraction"] < 1
    assert all(layer["intermediate_size"] % 8 == 0 for layer in payload["layers"])
    lm = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, reference, rtol=0, atol=1e-5)
    again = CliRunner().invoke(app, ["shrink", str(masked_dir), "--out", str(out)])
    assert isinstance(again.exception, SurgeonError) and "output directory is not empty" in str(again.exception)
    bad = CliRunner().invoke(app, ["shrink", str(masked_dir), "--out", str(tmp_path / "x"), "--rounding", "sideways"])
    assert isinstance(bad.exception, SurgeonError) and "--rounding must be up, down or nearest" in str(bad.exception)


@pytest.mark.parametrize("family", ("llama", "opt"))
def test_cli_info_reports_per_layer_sizes(family: str, checkpoints: dict) -> None:
    from typer.testing import CliRunner

    from surgeon_export.cli import app

    done = CliRunner().invoke(app, ["info", str(checkpoints[family]["per_layer"]), "--json", "--quiet"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert payload["model_type"] == f"surgeon_{family}"
    assert payload["layer_shapes"] == checkpoints[family]["report"]["layers"]
