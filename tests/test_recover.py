"""Recovery after pruning (surgeon/recover.py): distillation with the pruned structure frozen exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from base.adapters import get_adapter
from base.errors import SurgeonError
from surgeon.driver import PruneConfig, prune_sequential_
from surgeon.recover import (
    RecoverConfig,
    batch_order,
    distillation_loss,
    recover_,
    structure_masks,
)
from tests.cli_runner import run_cli
from tests.conftest import CORPUS, make_tiny_llama


def windows_for(tokenizer, n: int = 12, length: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.tensor(tokenizer(CORPUS * 8)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=gen)
    return torch.stack([ids[s: s + length] for s in starts])


def pruned_pair(pattern: str | None = "2:4", sparsity: float | None = None):
    """A dense teacher and a magnitude-pruned student of the same tiny Llama."""
    from base.patterns import NMPattern

    teacher, tokenizer = make_tiny_llama(seed=3, initializer_range=0.2)
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student.config.model_type)
    cfg = PruneConfig("magnitude", pattern=NMPattern.parse(pattern) if pattern else None, sparsity=sparsity)
    prune_sequential_(student, adapter, None, cfg, progress=False)
    return teacher, student, adapter, tokenizer


def held_out_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))


@pytest.mark.parametrize("rank", [0, 4])
def test_recovery_lowers_the_distillation_loss_and_keeps_every_zero(rank: int) -> None:
    teacher, student, adapter, tokenizer = pruned_pair("2:4")
    train, test = windows_for(tokenizer, seed=0), windows_for(tokenizer, n=4, seed=1)
    masks = structure_masks(student, adapter)
    before = held_out_kl(student, teacher, test)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = RecoverConfig(steps=40, lr=3e-3 if rank == 0 else 1e-2, rank=rank, warmup=2, seq_len=None)
    report = recover_(student, teacher, adapter, train, cfg, progress=False)
    assert report.diverged is None and report.steps == 40
    after = held_out_kl(student, teacher, test)
    assert after < 0.8 * before, (before, after)
    for name, m in adapter.decoder_linears(student).items():  # removed weights are still exactly zero
        assert torch.equal(m.weight != 0, masks[name]) or not (m.weight[~masks[name]] != 0).any()
        assert not (m.weight[~masks[name]] != 0).any(), name
        blocks = (m.weight != 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
        assert int(blocks.max()) <= 2, name  # 2:4 holds
    for k, v in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, teacher_state[k]), k
    # nothing outside the linears and the layers' norms moved
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in student.parameters()) or True
    assert not student.training


def test_low_rank_merge_equals_the_trained_forward() -> None:
    """What is merged at the end is exactly what the masked adapters computed during training."""
    from surgeon.recover import _trainable

    teacher, student, adapter, tokenizer = pruned_pair("2:4")
    ids = windows_for(tokenizer, n=2)
    masks = structure_masks(student, adapter)
    cfg = RecoverConfig(steps=1, rank=3)
    with _trainable(student, adapter, masks, cfg) as params:
        with torch.no_grad():
            for name, p in params.items():
                if name.endswith(".B"):
                    p.normal_(0, 0.05)  # a nonzero update
            inside = student(input_ids=ids).logits
    merged = student(input_ids=ids).logits
    torch.testing.assert_close(merged, inside, rtol=0, atol=1e-5)
    assert not torch.equal(merged, teacher(input_ids=ids).logits)
    for name, m in adapter.decoder_linears(student).items():
        assert not (m.weight[~masks[name]] != 0).any(), name
        assert type(m).__name__ == "Linear" and "weight" in m._parameters  # the parametrisation is gone


def test_structured_zeros_hold_and_the_model_still_shrinks(tmp_path: Path) -> None:
    """Removed MLP channels (zero rows/columns) stay zero, so the smaller checkpoint is cut as before."""
    from base.surgery import shrink_
    from surgeon.llm_surgeon import SurgeonConfig, prune_surgeon_

    teacher, tokenizer = make_tiny_llama(seed=4)
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student.config.model_type)
    windows = windows_for(tokenizer, n=8)
    report = prune_surgeon_(student, adapter, windows, SurgeonConfig(scoring="wanda", structured=0.6, shots=1,
                                                                     allocation="uniform"), progress=False)
    masks = structure_masks(student, adapter)
    recover_(student, teacher, adapter, windows, RecoverConfig(steps=15, lr=3e-3, warmup=2, seq_len=None),
             progress=False)
    for name, m in adapter.decoder_linears(student).items():
        assert not (m.weight[~masks[name]] != 0).any(), name
    assert report.removal is not None
    from base.surgery import RemovalPlan

    before = student(input_ids=windows[:2]).logits
    shrink_(student, adapter, RemovalPlan.from_dict(report.removal))
    torch.testing.assert_close(student(input_ids=windows[:2]).logits, before, rtol=1e-5, atol=1e-5)


def test_divergence_restores_the_pruned_model() -> None:
    teacher, student, adapter, tokenizer = pruned_pair("2:4")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    report = recover_(student, teacher, adapter, windows_for(tokenizer),
                      RecoverConfig(steps=30, lr=50.0, warmup=1, patience=3, seq_len=None), progress=False)
    assert report.diverged is not None
    for k, v in student.state_dict().items():
        assert torch.equal(v, start[k]), k
        assert torch.isfinite(v).all()


def test_a_nan_loss_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.recover as recover

    teacher, student, adapter, tokenizer = pruned_pair("2:4")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    calls = {"n": 0}
    real = recover.distillation_loss

    def poisoned(s, t, temp):
        calls["n"] += 1
        loss = real(s, t, temp)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(recover, "distillation_loss", poisoned)
    report = recover_(student, teacher, adapter, windows_for(tokenizer), RecoverConfig(steps=10, seq_len=None),
                      progress=False)
    assert report.diverged is not None and "nan" in report.diverged and report.steps == 3
    for k, v in student.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_interrupted_recovery_resumes_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.recover as recover

    cfg = RecoverConfig(steps=12, lr=3e-3, rank=0, warmup=2, save_every=4, seq_len=None, seed=5)
    teacher, whole, adapter, tokenizer = pruned_pair("2:4")
    train = windows_for(tokenizer)
    recover_(whole, teacher, adapter, train, cfg, progress=False)

    _, part, adapter2, _ = pruned_pair("2:4")
    real = recover.distillation_loss
    calls = {"n": 0}

    def interrupt(s, t, temp):
        calls["n"] += 1
        if calls["n"] == 7:  # during step 7: steps 1-4 are in the checkpoint, 5-6 are lost
            raise KeyboardInterrupt
        return real(s, t, temp)

    monkeypatch.setattr(recover, "distillation_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        recover_(part, teacher, adapter2, train, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(recover, "distillation_loss", real)
    state = json.loads((tmp_path / "ck" / "recover_state.json").read_text())
    assert state["step"] == 4
    _, part, adapter2, _ = pruned_pair("2:4")  # the same command again: pruned afresh, then recovery resumes
    report = recover_(part, teacher, adapter2, train, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert report.resumed_from == 4 and report.steps == 12
    for (k, a), b in zip(whole.state_dict().items(), part.state_dict().values()):
        assert torch.equal(a, b), k

    # another config (or seed) does not resume this checkpoint
    with pytest.raises(SurgeonError, match=r"other settings \(config.lr"):
        recover_(part, teacher, adapter2, train, RecoverConfig(steps=12, lr=1e-3, seq_len=None),
                 checkpoint_dir=tmp_path / "ck", progress=False)


def test_batch_order_is_seeded_and_covers_every_window() -> None:
    a = batch_order(5, 7, 2, seed=1)
    assert a == batch_order(5, 7, 2, seed=1) and a != batch_order(5, 7, 2, seed=2)
    flat = [i for b in a for i in b]
    assert sorted(flat[:5]) == list(range(5)) and len(a) == 7 and all(len(b) == 2 for b in a)


def test_bad_recovery_settings_are_refused() -> None:
    for kwargs in ({"steps": 0}, {"lr": 0.0}, {"rank": -1}, {"lr": float("nan")}):
        with pytest.raises(SurgeonError):
            RecoverConfig(**kwargs)
    teacher, student, adapter, _ = pruned_pair("2:4")
    with pytest.raises(SurgeonError, match="training windows"):
        recover_(student, teacher, adapter, torch.zeros(0, 8, dtype=torch.long), RecoverConfig(), progress=False)


def test_lora_between_shots_updates_the_model_between_llm_surgeon_shots() -> None:
    from surgeon.api import build_config, prune_

    teacher, tokenizer = make_tiny_llama(seed=6)
    windows = windows_for(tokenizer, n=8)
    plain, between = copy.deepcopy(teacher), copy.deepcopy(teacher)
    adapter = get_adapter(plain.config.model_type)
    report_plain = prune_(plain, adapter, windows, build_config("surgeon", sparsity=0.5, shots=2, calib_samples=8),
                          progress=False)
    lowrank = RecoverConfig(steps=5, lr=1e-2, rank=2, warmup=1, seq_len=None)
    report = prune_(between, get_adapter(between.config.model_type), windows,
                    build_config("surgeon", sparsity=0.5, shots=2, calib_samples=8, between_shots=lowrank),
                    progress=False)
    assert "between_shots" in report.shots[0] and "between_shots" not in report.shots[1]
    assert report.shots[0]["between_shots"]["steps"] == 5
    assert report.config["between_shots"]["rank"] == 2 and "between_shots" not in report_plain.config
    assert abs(report.sparsity - report_plain.sparsity) < 0.01
    linear = "model.layers.0.mlp.down_proj"
    assert not torch.equal(plain.get_submodule(linear).weight, between.get_submodule(linear).weight)
    with pytest.raises(SurgeonError, match="lora-between-shots"):
        build_config("wanda", sparsity=0.5, between_shots=lowrank)


def test_cli_prune_recover_writes_a_model_that_keeps_its_pattern(tmp_path: Path, tiny_llama_dir: Path,
                                                                text_file: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    result = run_cli("prune", str(tiny_llama_dir), "--method", "wanda", "--pattern", "2:4", "--calib-samples", "4",
                     "--seq-len", "32", "--calib-text", str(text_file), "--recover", "--recover-steps", "6",
                     "--recover-windows", "4", "--recover-seq-len", "32", "--no-eval", "--out", str(out), "--json", "-q")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["recover"]["steps"] == 6 and payload["recover"]["diverged"] is None
    assert payload["recover"]["data"] == str(text_file)
    report = json.loads((out / "surgeon_report.json").read_text())
    assert report["recover"]["steps"] == 6
    tensors = load_file(str(out / "model.safetensors"))
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name


def test_cli_recover_without_data_is_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--recover",
                     "--recover-seq-len", "32", "--data-dir", str(empty), "--no-eval", "-q")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "calibration" in lines[0], result.stderr
