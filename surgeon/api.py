"""One entry point for pruning: :func:`prune_` dispatches on its config.

- :class:`~surgeon.llm_surgeon.SurgeonConfig`: LLM Surgeon (unstructured, N:M, structured,
  structured + N:M), and the structured baselines (``scoring="wanda"`` / ``"magnitude"``: the same
  coupled groups scored without curvature);
- :class:`~surgeon.driver.PruneConfig`: the layer-wise baselines (SparseGPT, Wanda, magnitude);
- either with ``refine=SDSConfig(...)``: SDS after the first round (unstructured and N:M).

:func:`build_config` turns the command line's words into one of these configs with each method's
defaults (the CLI and :mod:`surgeon_export.api` both call it), and :func:`calibration_size` says how
many calibration windows a config uses by default.

Example:
    >>> cfg = build_config("surgeon", pattern="2:4")  # doctest: +SKIP
    >>> report = prune_(lm.model, lm.adapter, windows, cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from base.adapters import Adapter
from base.distributed import world_size
from base.errors import SurgeonError, check_choice
from base.patterns import NMPattern, check_sparsity
from surgeon.curvature.activations import leading_positions_left_out
from surgeon.driver import (
    PRUNERS,
    LayerStream,
    PruneConfig,
    PruneReport,
    prune_sequential_,
)
from surgeon.llm_surgeon import SurgeonConfig, prune_surgeon_
from surgeon.recover import RecoverConfig, recover_
from surgeon.sds import SDSConfig
from surgeon.streamed_surgeon import prune_surgeon_streamed_

METHODS = ("surgeon", *PRUNERS)  # surgeon, magnitude, wanda, sparsegpt
Config = PruneConfig | SurgeonConfig
# LLM Surgeon's windows, as measured on the default model: element targets take A from 64
# windows and G from the first 16 (2:4: 72.1 vs 76.4 with both from 16); structured runs use 16
# windows for both (the recorded structured tables). Every other method: 64.
CALIB_WINDOWS = 64
SURGEON_STRUCTURED_WINDOWS = 16
SURGEON_KFAC_WINDOWS = 16


def build_config(
    method: str,
    *,
    sparsity: float | None = None,
    pattern: str | NMPattern | None = None,
    structured: float | None = None,
    shots: int = 3,
    allocation: str | None = None,
    correlation: str = "joint",
    group_cost: str = "output",
    fisher: str = "empirical",
    kfac_samples: int | None = None,
    kfac_batch: int = 4,
    calib_batch: int = 8,
    calib_samples: int | None = None,
    true_sequential: bool = False,
    refine: SDSConfig | None = None,
    between_shots: RecoverConfig | None = None,
) -> Config:
    """The config that ``prune --method METHOD ...`` describes, checked before anything is loaded.

    ``structured`` (remaining fraction of decoder-linear weights) works with ``surgeon`` (K-FAC
    costs and updates) and with ``wanda`` / ``magnitude`` (scores on the same coupled groups, no
    update); ``pattern`` may be added to ``structured`` for LLM Surgeon. ``allocation`` defaults
    to each method's measured best: ``global`` for LLM Surgeon, ``uniform`` for the structured
    baselines (Wanda-style channel scores at 80% kept: 50.14 uniform, 202.1 global).
    ``kfac_batch`` (LLM Surgeon and the structured baselines) and ``calib_batch`` (the layer-wise
    methods) are the windows per calibration batch: the unit that ranks share under torchrun.
    """
    if method not in METHODS:
        raise SurgeonError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if structured is not None and method == "sparsegpt":
        raise SurgeonError("--structured works with --method surgeon, wanda or magnitude (scores on coupled groups)")
    if structured is None and (sparsity is None) == (pattern is None):
        raise SurgeonError("give exactly one of --sparsity (unstructured), --pattern (e.g. 2:4) or --structured")
    if refine is not None and structured is not None:
        raise SurgeonError("--refine sds works on unstructured (--sparsity) and N:M (--pattern) pruning, not --structured")
    if between_shots is not None and method != "surgeon":
        raise SurgeonError("--lora-between-shots works with --method surgeon (low-rank updates between its shots)")
    if allocation is None:
        allocation = "global" if method == "surgeon" else "uniform"
    check_choice("--allocation", allocation, ("global", "uniform"))
    check_choice("--correlation", correlation, ("joint", "rows", "none"))
    check_choice("--group-cost", group_cost, ("sum", "output"))
    check_choice("--fisher", fisher, ("empirical", "true"))
    if calib_samples is not None and calib_samples < 1:
        raise SurgeonError(f"--calib-samples must be at least 1, got {calib_samples}")
    if kfac_batch < 1:
        raise SurgeonError(f"--kfac-batch must be at least 1, got {kfac_batch}")
    if calib_batch < 1:
        raise SurgeonError(f"--calib-batch must be at least 1, got {calib_batch}")
    target_sparsity = check_sparsity(sparsity) if sparsity is not None else None
    target_pattern = NMPattern.parse(pattern) if isinstance(pattern, str) else pattern
    if method == "surgeon" or structured is not None:
        n_calib = calib_samples if calib_samples is not None else (
            SURGEON_STRUCTURED_WINDOWS if method == "surgeon" and structured is not None else CALIB_WINDOWS)
        if kfac_samples is None and method == "surgeon" and structured is None and n_calib > SURGEON_KFAC_WINDOWS:
            kfac_samples = SURGEON_KFAC_WINDOWS
        return SurgeonConfig(
            scoring="surgeon" if method == "surgeon" else method,  # type: ignore[arg-type]
            sparsity=target_sparsity, pattern=target_pattern, structured=structured,
            shots=shots if method == "surgeon" else 1,
            allocation=allocation,  # type: ignore[arg-type]
            correlation=correlation, fisher=fisher, group_cost=group_cost,  # type: ignore[arg-type]
            kfac_windows=kfac_samples, batch_size=kfac_batch, refine=refine, between_shots=between_shots,
        )
    return PruneConfig(method=method, sparsity=target_sparsity, pattern=target_pattern,  # type: ignore[arg-type]
                       batch_size=calib_batch, true_sequential=true_sequential, refine=refine)


def calibration_size(config: Config) -> int:
    """Calibration windows a config uses by default (LLM Surgeon structured: 16; everything else: 64)."""
    if isinstance(config, SurgeonConfig) and config.scoring == "surgeon" and config.structured is not None:
        return SURGEON_STRUCTURED_WINDOWS
    return CALIB_WINDOWS


def needs_calibration(config: Config) -> bool:
    """Whether the config reads calibration data (magnitude alone does not; SDS always does)."""
    if isinstance(config, PruneConfig):
        return config.statistics != "none"
    return True


def check_model(model: nn.Module, adapter: Adapter, config: Config) -> None:
    """Refuse a target the model cannot take (an N:M block that does not divide a linear's inputs)."""
    if config.pattern is not None:
        for name, linear in adapter.decoder_linears(model).items():
            config.pattern.check_shape(linear.in_features, name)


def check_streamable(config: Config) -> None:
    """Refuse what does not run streamed (one layer in memory) yet: SDS or low-rank updates after LLM Surgeon."""
    if isinstance(config, SurgeonConfig) and (config.refine is not None or config.between_shots is not None):
        raise SurgeonError("LLM Surgeon with --refine sds or --lora-between-shots does not run streamed yet (both need "
                           "the whole pruned model); use --no-streaming")


def prune_(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor | None,
    config: Config,
    *,
    checkpoint_dir: Path | None = None,
    binding: dict | None = None,
    stream: LayerStream | None = None,
    spill: Path | None = None,
    progress: bool = True,
    leading_bos: bool = False,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says; returns the report.

    Args:
        windows: calibration token ids ``[N, T]`` (None only where :func:`needs_calibration` is false).
        checkpoint_dir: LLM Surgeon: the state after every shot is saved there; a rerun resumes.
        binding: LLM Surgeon with ``checkpoint_dir``: what else the checkpoint must match to be
            resumed (the source's identity, the seed; config and calibration windows always are).
        stream: layers read from and written to disk one at a time
            (:class:`export.streaming.StreamedLayers`); ``model`` then has its layers on meta.
        spill: LLM Surgeon with ``stream``: the directory for its layer walk's files and resume state
            (:mod:`surgeon.streamed_surgeon`).
        leading_bos: the windows lead with BOS: every calibration statistic (input moments, K-FAC's ``A`` and
            ``G``, SDS's pairs) leaves that position out (:func:`~surgeon.curvature.activations.
            leading_positions_left_out`; measured in docs/llm_surgeon.md, "BOS"). The loss keeps it.

    Structured runs record the removed groups in ``report.removal`` (a
    :class:`~base.surgery.RemovalPlan` as a dict), which the smaller checkpoint is cut by.
    """
    check_model(model, adapter, config)
    if needs_calibration(config) and windows is None:
        raise SurgeonError("this pruning config needs calibration windows")
    with leading_positions_left_out(1 if leading_bos and windows is not None else 0):
        return _prune(model, adapter, windows, config, checkpoint_dir, binding, stream, spill, progress)


def _prune(model: nn.Module, adapter: Adapter, windows: torch.Tensor | None, config: Config,
           checkpoint_dir: Path | None, binding: dict | None, stream: LayerStream | None, spill: Path | None,
           progress: bool) -> PruneReport:
    if stream is not None:
        check_streamable(config)
    if isinstance(config, SurgeonConfig) and config.between_shots is not None and world_size() > 1:
        raise SurgeonError("--lora-between-shots does not run data-parallel yet (it trains the whole model); "
                           "run it in one process")
    if isinstance(config, PruneConfig):
        return prune_sequential_(model, adapter, windows, config, stream=stream, progress=progress)
    if stream is not None:
        if spill is None:
            raise ValueError("streamed LLM Surgeon needs a spill directory")
        return prune_surgeon_streamed_(model, adapter, windows, config, stream, spill, progress=progress)
    sds = config.refine
    dense = copy.deepcopy(model) if sds or config.between_shots else None  # SDS's and recovery's teacher
    between = None
    if config.between_shots is not None:
        lowrank = config.between_shots

        def between(shot: int, keep: dict[str, torch.Tensor]) -> dict:
            # the paper's interleaved low-rank update: distil the pruned model between shots, its masks frozen;
            # the next shot's curvature is estimated on the updated model
            done = recover_(model, dense, adapter, windows, replace(lowrank, seed=lowrank.seed + shot), masks=keep,
                            progress=progress)
            return {k: v for k, v in done.to_dict().items() if k != "losses"}

    report = prune_surgeon_(model, adapter, windows, config, checkpoint_dir=checkpoint_dir,  # type: ignore[arg-type]
                            binding=binding, progress=progress, between_shots=between)
    if sds:  # LLM Surgeon's model is the first round; each linear is re-pruned to its own sparsity
        refined = prune_sequential_(model, adapter, windows, PruneConfig("sparsegpt", pattern=config.pattern, refine=sds),
                                    teacher=dense, progress=progress)
        report.refine, report.layers = refined.refine, refined.layers
        report.seconds += refined.seconds
    return report
