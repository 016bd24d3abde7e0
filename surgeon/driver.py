"""The sequential layer-by-layer driver shared by every layer-wise pruner.

As in the reference SparseGPT and Wanda code: the calibration windows enter decoder layer 0; for
each layer l, the inputs of its linears are accumulated (second moment ``A``), every linear is
pruned from those statistics, and the layer's outputs are recomputed with the *pruned* weights
to become the inputs of layer l+1. Magnitude pruning needs no data and skips the forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from surgeon.adapters import Adapter
from surgeon.baselines.common import Target
from surgeon.baselines.magnitude import prune_magnitude
from surgeon.baselines.sparsegpt import prune_sparsegpt
from surgeon.baselines.wanda import prune_wanda
from surgeon.calibrate import capture_layer_inputs, input_moments, run_layer
from surgeon.prune.patterns import NMPattern, check_sparsity

log = logging.getLogger(__name__)

LayerwiseMethod = Literal["magnitude", "wanda", "sparsegpt"]
LayerPruner = Callable[..., tuple[torch.Tensor, torch.Tensor]]

PRUNERS: dict[str, LayerPruner] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
}


@dataclass
class PruneConfig:
    """What to remove and how. Exactly one of ``sparsity`` (unstructured) or ``pattern`` (N:M)."""

    method: LayerwiseMethod = "sparsegpt"
    sparsity: float | None = None
    pattern: NMPattern | None = None
    batch_size: int = 8  # calibration windows per forward pass
    true_sequential: bool = False  # re-collect inputs after each group of linears (q/k/v, o, gate/up, down)

    @property
    def target(self) -> Target:
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity or pattern")
        return self.pattern if self.pattern is not None else check_sparsity(self.sparsity)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = str(self.pattern) if self.pattern else None
        return d


@dataclass
class PruneReport:
    """What was removed where, and what it cost in time."""

    config: dict
    layers: dict[str, dict] = field(default_factory=dict)  # linear name -> {shape, zeros, sparsity}
    seconds: float = 0.0
    shots: list[dict] = field(default_factory=list)  # multi-shot methods: one record per shot

    @property
    def sparsity(self) -> float:
        total = sum(v["numel"] for v in self.layers.values())
        return sum(v["zeros"] for v in self.layers.values()) / total

    def record(self, name: str, linear: nn.Linear) -> None:
        """Count the zeros of ``linear`` as it is now (measured, not taken from the pruner)."""
        zeros = int((linear.weight == 0).sum())
        self.layers[name] = {"shape": list(linear.weight.shape), "numel": linear.weight.numel(),
                             "zeros": zeros, "sparsity": zeros / linear.weight.numel()}

    def to_dict(self) -> dict:
        return {"config": self.config, "sparsity": self.sparsity, "seconds": self.seconds,
                "shots": self.shots, "layers": self.layers}


def check_targets(model: nn.Module, adapter: Adapter, cfg: PruneConfig) -> None:
    """Validate the target against every linear before any work starts."""
    target = cfg.target
    if isinstance(target, NMPattern):
        for name, linear in adapter.decoder_linears(model).items():
            target.check_shape(linear.in_features, name)


@torch.no_grad()
def prune_sequential_(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor | None,
    cfg: PruneConfig,
    *,
    progress: bool = True,
) -> PruneReport:
    """Prune every decoder linear of ``model`` in place, layer by layer; returns the report.

    Args:
        windows: calibration token ids ``[N, T]``; may be None for magnitude pruning.
        cfg: method and target.

    Example:
        >>> report = prune_sequential_(lm.model, lm.adapter, windows, PruneConfig("wanda", 0.5))  # doctest: +SKIP
    """
    check_targets(model, adapter, cfg)
    prune = PRUNERS[cfg.method]
    needs_data = cfg.method != "magnitude"
    if needs_data and windows is None:
        raise ValueError(f"{cfg.method} needs calibration windows")
    start = time.perf_counter()
    report = PruneReport(config=cfg.to_dict())
    layers = adapter.decoder_layers(model)
    batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size) if needs_data else []
    n_tokens = int(windows.numel()) if needs_data else 0
    # One pass collects every group's statistics; true-sequential re-collects each group's after
    # the groups before it were pruned (q/k/v, then o, then gate/up, then down).
    steps = tuple((g,) for g in adapter.input_groups) if cfg.true_sequential else (adapter.input_groups,)
    for index, layer in enumerate(tqdm(layers, desc=f"prune ({cfg.method})", unit="layer", disable=not progress)):
        for step in steps:
            moments = input_moments(layer, adapter, batches, step) if needs_data else {}
            for name in (n for group in step for n in group):
                linear = layer.get_submodule(name)
                A = moments[name].finalize() if needs_data else None
                W_new, keep = prune(linear.weight.data, A, n_tokens, cfg.target)
                linear.weight.data.copy_(W_new)
                report.record(f"{adapter.layers}.{index}.{name}", linear)
        if needs_data:
            batches = run_layer(layer, batches)
    report.seconds = time.perf_counter() - start
    log.info("pruned %d linears to %.2f%% sparsity in %.0f s", len(report.layers), 100 * report.sparsity, report.seconds)
    return report
