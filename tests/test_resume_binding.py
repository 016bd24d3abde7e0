"""LLM Surgeon's --checkpoint resumes only what it was made from: the same model, seed, calibration and settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from base.errors import SurgeonError
from surgeon_export import api
from tests.conftest import make_tiny_llama

CFG = dict(sparsity=0.5, shots=2)


def save_tiny(path: Path, seed: int = 0, **overrides) -> Path:
    model, tokenizer = make_tiny_llama(seed=seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prune(model_dir: Path, text: Path, checkpoint: Path, seed: int = 0, shots: int = 2) -> api.PruneReport:
    lm = api.load(model_dir)
    cfg = api.build_config("surgeon", sparsity=0.5, shots=shots)
    return api.prune(lm, cfg, calib_samples=4, seq_len=16, seed=seed, calib_text=text, checkpoint=checkpoint)


def linear_weights(lm: api.LoadedModel) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in lm.adapter.decoder_linears(lm.model).items()}


def test_resume_refuses_another_seed_model_or_shapes(tmp_path: Path, text_file: Path) -> None:
    torch.set_num_threads(1)
    source = save_tiny(tmp_path / "a")
    ckpt = tmp_path / "ckpt"
    prune(source, text_file, ckpt)
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["binding"]["seed"] == 0 and len(progress["binding"]["source model"]) == 64
    assert sorted(p.name for p in ckpt.iterdir()) == ["progress.json", "state-2.safetensors"]

    with pytest.raises(SurgeonError) as err:  # another seed: other calibration windows
        prune(source, text_file, ckpt, seed=1)
    assert str(err.value).count("\n") == 0 and "other settings (calibration windows, seed)" in str(err.value)

    with pytest.raises(SurgeonError, match=r"made with other settings \(config.shots\)"):
        prune(source, text_file, ckpt, shots=3)

    same_shapes = save_tiny(tmp_path / "b", seed=1)  # same shapes, other weights: no hybrid
    with pytest.raises(SurgeonError, match=r"made with another model;"):
        prune(same_shapes, text_file, ckpt)

    other_shapes = save_tiny(tmp_path / "c", intermediate_size=48)  # no RuntimeError traceback
    with pytest.raises(SurgeonError, match=r"made with another model;"):
        prune(other_shapes, text_file, ckpt)


def test_a_finished_checkpoint_resumes_to_the_same_weights_and_a_damaged_one_is_refused(
    tmp_path: Path, text_file: Path
) -> None:
    torch.set_num_threads(1)
    source = save_tiny(tmp_path / "a")
    ckpt = tmp_path / "ckpt"
    lm = api.load(source)
    api.prune(lm, api.build_config("surgeon", **CFG), calib_samples=4, seq_len=16, calib_text=text_file,
              checkpoint=ckpt)
    first = linear_weights(lm)
    again = api.load(source)  # every shot done: the state is read back, nothing recomputed
    api.prune(again, api.build_config("surgeon", **CFG), calib_samples=4, seq_len=16, calib_text=text_file,
              checkpoint=ckpt)
    for name, w in linear_weights(again).items():
        assert torch.equal(w, first[name]), name

    state = ckpt / "state-2.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's last value
    state.write_bytes(bytes(data))
    with pytest.raises(SurgeonError, match="does not match its checksum"):
        api.prune(api.load(source), api.build_config("surgeon", **CFG), calib_samples=4, seq_len=16,
                  calib_text=text_file, checkpoint=ckpt)
