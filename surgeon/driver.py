"""The sequential layer-by-layer driver shared by every layer-wise pruner.

As in the reference SparseGPT and Wanda code: the calibration windows enter decoder layer 0; for
each layer l, the inputs of its linears are accumulated (second moment ``A``), every linear is
pruned from those statistics, and the layer's outputs are recomputed with the *pruned* weights
to become the inputs of layer l+1. Magnitude pruning needs no data and skips the forward passes.

Data-parallel (:mod:`base.distributed`, ``torchrun``): each rank runs its own calibration batches
through the layers (the batches one process forms, dealt round-robin), the input statistics add
every rank's batches in their global order at every layer, bit for bit as one process adds them
(inside :func:`~surgeon.calibrate.input_moments` / :func:`~surgeon.sds.pair_moments`), each
linear is pruned (and refined) by the rank :func:`~base.distributed.assign` gives it, and its
weights are then broadcast, so every rank goes on with the same layer.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Literal, Protocol

import torch
from torch import nn
from tqdm import tqdm

from base.adapters import Adapter
from base.distributed import assign, broadcast_json, rank, share
from base.errors import SurgeonError
from base.patterns import NMPattern, check_sparsity
from surgeon.baselines.common import Target
from surgeon.baselines.magnitude import prune_magnitude
from surgeon.baselines.sparsegpt import prune_sparsegpt
from surgeon.baselines.wanda import prune_wanda
from surgeon.calibrate import capture_layer_inputs, input_moments, run_layer
from surgeon.curvature.activations import SecondMoment, calibration_positions
from surgeon.sds import LayerPruner, SDSConfig, pair_moments, refine_linear, self_stats

log = logging.getLogger(__name__)

LayerwiseMethod = Literal["magnitude", "wanda", "sparsegpt"]
PRUNERS: dict[str, LayerPruner] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
}
# SDS re-prunes weights whose L1 step left many exact zeros: SparseGPT's reference rule ("prune
# everything at or below the k-th score") would remove every tied zero and overshoot the target.
REPRUNERS: dict[str, LayerPruner] = {**PRUNERS, "sparsegpt": partial(prune_sparsegpt, mask_rule="exact")}


@dataclass
class PruneConfig:
    """What to remove and how. Exactly one of ``sparsity`` (unstructured) or ``pattern`` (N:M)."""

    method: LayerwiseMethod = "sparsegpt"
    sparsity: float | None = None
    pattern: NMPattern | None = None
    batch_size: int = 8  # calibration windows per forward pass
    true_sequential: bool = False  # re-collect inputs after each group of linears (q/k/v, o, gate/up, down)
    refine: SDSConfig | None = None  # SDS: re-densify and prune again, layer by layer (surgeon/sds.py)

    @property
    def target(self) -> Target:
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity or pattern")
        return self.pattern if self.pattern is not None else check_sparsity(self.sparsity)  # type: ignore[arg-type]

    @property
    def statistics(self) -> Literal["none", "diagonal", "matrix"]:
        """The input statistics the method reads: none (magnitude), ``diag(A)`` (Wanda), the whole ``A``
        (SparseGPT, and every method with SDS)."""
        if self.refine is not None:
            return "matrix"
        return {"magnitude": "none", "wanda": "diagonal"}.get(self.method, "matrix")  # type: ignore[return-value]

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
    refine: dict[str, dict] = field(default_factory=dict)  # SDS: linear name -> errors per step, seconds
    layer_seconds: list[float] = field(default_factory=list)
    layer_peak_rss_mib: list[float] = field(default_factory=list)  # streamed LLM Surgeon: peak RSS after each layer's last step
    removal: dict | None = None  # structured: the removed groups, a base.surgery.RemovalPlan as a dict
    calibration: str | None = None  # where the calibration windows came from
    bos: bool | None = None  # whether every calibration window led with BOS (the tokenizer's convention)
    bos_statistics: str | None = None  # with BOS: "include" or "exclude" its position from the statistics
    distributed: dict | None = None  # data-parallel runs: world size, and per rank seconds, peak RSS, collective time

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
        out = {"calibration": self.calibration, "config": self.config, "sparsity": self.sparsity,
               "seconds": self.seconds, "layer_seconds": [round(t, 2) for t in self.layer_seconds],
               "shots": self.shots, "layers": self.layers}
        if self.bos is not None:
            out["bos"] = self.bos
        if self.bos:
            out["bos_statistics"] = self.bos_statistics
        if self.layer_peak_rss_mib:
            out["layer_peak_rss_mib"] = [round(m, 1) for m in self.layer_peak_rss_mib]
        if self.refine:
            out["refine"] = {"summary": refine_summary(self.refine), "linears": self.refine}
        if self.removal is not None:
            out["removal"] = self.removal
        if self.distributed is not None:
            out["distributed"] = self.distributed
        return out


def refine_summary(records: dict[str, dict]) -> dict:
    """Mean relative layer error after each SDS step, fallbacks and seconds, over all linears."""
    n = len(records)
    mean = {k: sum(r[k] for r in records.values()) / n for k in ("first", "dense", "reprune", "final", "adjusted")}
    choices = dict(Counter(r["choice"] for r in records.values()))
    per_layer: dict[str, float] = {}
    for name, r in records.items():  # "model.layers.7.mlp.up_proj" -> layer "7"
        match = re.search(r"\.(\d+)\.", name)
        layer = match.group(1) if match else name
        per_layer[layer] = per_layer.get(layer, 0.0) + r["seconds"]
    return {"linears": n, "mean_error": mean, "mean_error_used": sum(r["used"] for r in records.values()) / n,
            "fallbacks": sum(r["fallback"] for r in records.values()), "choices": choices,
            "seconds": sum(r["seconds"] for r in records.values()),
            "seconds_per_layer": {k: round(v, 2) for k, v in per_layer.items()}}


class LayerStream(Protocol):
    """Where the driver's layers come from and where they go, one at a time."""

    num_layers: int
    dtype: torch.dtype | None  # the dtype the layers are finally written in (None: kept as they are)

    def enter(self, index: int) -> nn.Module:
        """Decoder layer ``index``, ready to run (already pruned if :meth:`finished` says so)."""

    def dense(self, index: int) -> nn.Module:
        """A dense copy of layer ``index`` (SDS's teacher); called before the layer is pruned."""

    def finished(self, index: int) -> dict | None:
        """The records (``layers``, ``refine``, ``seconds``) of a layer an earlier run pruned, else None."""

    def leave(self, index: int, layer: nn.Module, records: dict | None) -> None:
        """Layer ``index`` is done: pruned now (``records``) or replayed (None)."""

    def captured(self) -> None:
        """The first layer's inputs are taken: nothing before the layers (the embeddings) runs again."""


class InMemoryLayers:
    """The layers of a model in memory (the whole-model mode)."""

    def __init__(self, model: nn.Module, adapter: Adapter, teacher: nn.Module | None = None) -> None:
        self.layers = adapter.decoder_layers(model)
        self.teachers = adapter.decoder_layers(teacher) if teacher is not None else None
        self.num_layers = len(self.layers)
        self.dtype = None

    def enter(self, index: int) -> nn.Module:
        return self.layers[index]

    def dense(self, index: int) -> nn.Module:
        return self.teachers[index] if self.teachers is not None else copy.deepcopy(self.layers[index])

    def finished(self, index: int) -> dict | None:
        return None

    def leave(self, index: int, layer: nn.Module, records: dict | None) -> None:
        pass

    def captured(self) -> None:
        pass


def linear_cost(linear: nn.Linear) -> float:
    """Estimated work of pruning one linear, for splitting a layer's linears across ranks: SparseGPT's
    ``O(d_in^3)`` factorisation and ``O(d_in^2 d_out)`` sweep (the other methods scale alike or less)."""
    d_out, d_in = linear.weight.shape
    return float(d_in) ** 2 * (d_in + d_out)


def mean_moment(moments: dict[str, SecondMoment], name: str, means: dict[int, torch.Tensor]) -> torch.Tensor:
    """``A`` of ``name``'s input: its accumulator finalised in place the first time (linears reading one
    input share it), so a layer holds one ``d_in²`` matrix per input, not a running sum and a copy."""
    moment = moments[name]
    if id(moment) not in means:
        means[id(moment)] = moment.finalize(consume=True)
    return means[id(moment)]


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
    teacher: nn.Module | None = None,
    stream: LayerStream | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune every decoder linear of ``model`` in place, layer by layer; returns the report.

    Args:
        windows: calibration token ids ``[N, T]``; may be None for magnitude pruning.
        cfg: method and target; with ``cfg.refine`` each linear is refined by SDS right after its
            first-round pruning, against the dense layer on the dense model's own inputs.
        teacher: SDS after a global pruner (LLM Surgeon): ``model`` is already pruned and is the
            first round; ``teacher`` is the dense model. ``cfg.method`` re-prunes each linear to
            its own first-round sparsity (or ``cfg.pattern``), so the global allocation stays.
        stream: where the layers come from and go to (default: ``model``'s own, in memory). A
            streamed run (``export.streaming``) hands ``model`` with its layers on the meta device,
            reads each layer from disk when it is its turn and writes it out when it is pruned.

    Example:
        >>> report = prune_sequential_(lm.model, lm.adapter, windows, PruneConfig("wanda", 0.5))  # doctest: +SKIP
    """
    refine = cfg.refine
    if teacher is not None and refine is None:
        raise ValueError("a teacher model is only used by SDS refinement (cfg.refine)")
    if teacher is None or cfg.pattern is not None:  # after a global pruner, each linear keeps its own sparsity
        check_targets(model, adapter, cfg)
    prune = PRUNERS[cfg.method]
    needs_data = cfg.statistics != "none"
    if needs_data and windows is None:
        raise SurgeonError(f"{cfg.method}{' with SDS' if refine else ''} needs calibration windows")
    start = time.perf_counter()
    report = PruneReport(config=cfg.to_dict())
    stream = stream if stream is not None else InMemoryLayers(model, adapter, teacher)
    batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size) if needs_data else []
    stream.captured()
    dense_stream = refine is not None and refine.teacher == "dense"
    t_batches = list(batches) if dense_stream else batches  # run_layer consumes its list: two streams, two lists
    n_tokens = int(calibration_positions(windows[..., None]).numel()) if needs_data else 0  # behind the statistics
    # One pass collects every group's statistics; true-sequential re-collects each group's after
    # the groups before it were pruned (q/k/v, then o, then gate/up, then down).
    # SDS always re-collects: its refit weights are tuned to their inputs, and o_proj / down_proj
    # statistics from the unpruned q/k/v and gate/up misjudged them badly (SparseGPT 2:4 + SDS:
    # down_proj errors 2-3x the predicted ones in the real model, perplexity 2500).
    per_group = cfg.true_sequential or refine is not None
    steps = tuple((g,) for g in adapter.input_groups) if per_group else (adapter.input_groups,)
    desc = f"prune ({cfg.method}{' + SDS' if refine else ''})"
    for index in tqdm(range(stream.num_layers), desc=desc, unit="layer", disable=not progress):
        layer_start = time.perf_counter()
        layer = stream.enter(index)
        done = stream.finished(index)
        if done is not None:  # pruned and saved by an earlier run: replay it for the next layer's inputs
            report.layers.update(done["layers"])
            report.refine.update(done["refine"])
            report.layer_seconds.append(done["seconds"])
            if needs_data:
                t_batches = run_layer(stream.dense(index), t_batches) if dense_stream else t_batches
                batches = run_layer(layer, batches)
                t_batches = t_batches if dense_stream else batches
            stream.leave(index, layer, None)
            continue
        # SDS's teacher: the dense layer (a copy, as this one is about to change), run on the dense stream.
        t_layer = stream.dense(index) if refine else None
        next_t: list | None = None
        names = []
        for k, step in enumerate(steps):
            linears = {n: layer.get_submodule(n) for group in step for n in group}
            owners = assign({n: linear_cost(m) for n, m in linears.items()})  # all rank 0's with one process
            if refine and refine.teacher == "self":
                moments = input_moments(layer, adapter, batches, step)
                stats = {n: self_stats(moments[n].finalize(), t_layer.get_submodule(n).weight.data, n_tokens)
                         for n in linears if owners[n] == rank()}
            elif refine:  # "dense": the dense model's own stream; "layer": the pruned model's stream
                stats, outs = pair_moments(layer, t_layer, adapter, batches, t_batches if dense_stream else batches,
                                           step, teacher_outputs=dense_stream and k == 0)
                next_t = outs if k == 0 else next_t  # the teacher's outputs come from its first pass
            else:
                moments = input_moments(layer, adapter, batches, step, diagonal=cfg.statistics == "diagonal") \
                    if needs_data else {}
            means: dict[int, torch.Tensor] = {}  # A per shared accumulator, finalised once, in place
            records: dict[str, dict] = {}  # SDS: this rank's linears' records, reported in the linears' order below
            for name, linear in linears.items():
                full = f"{adapter.layers}.{index}.{name}"
                names.append(full)
                if owners[name] != rank():  # another rank prunes it; its weights arrive below
                    continue
                if refine:
                    W = linear.weight.data
                    if teacher is None:
                        W1, _ = prune(W, stats[name].A, n_tokens, cfg.target)
                        target = cfg.target
                    else:  # the model holds the first round already
                        W1 = W.clone()
                        target = cfg.pattern if cfg.pattern is not None else float((W == 0).sum()) / W.numel()
                    W_new, records[full] = refine_linear(
                        t_layer.get_submodule(name).weight.data, W1, stats[name], target, REPRUNERS[cfg.method],
                        refine, full)
                else:
                    A = mean_moment(moments, name, means) if needs_data else None
                    W_new, _ = prune(linear.weight.data, A, n_tokens, cfg.target)
                linear.weight.data.copy_(W_new)
            share({n: [m.weight.data] for n, m in linears.items()}, owners)
            for name, linear in linears.items():
                full = f"{adapter.layers}.{index}.{name}"
                if refine:
                    report.refine[full] = broadcast_json(owners[name], records.get(full))
                report.record(full, linear)
            moments = stats = means = {}  # free this step's statistics before the next step collects its own
        del t_layer
        if needs_data:
            batches = run_layer(layer, batches)
            t_batches = next_t if dense_stream else batches  # type: ignore[assignment]
        report.layer_seconds.append(time.perf_counter() - layer_start)
        stream.leave(index, layer, {"layers": {n: report.layers[n] for n in names},
                                    "refine": {n: report.refine[n] for n in names if n in report.refine},
                                    "seconds": report.layer_seconds[-1]})
    report.seconds = time.perf_counter() - start
    log.info("pruned %d linears to %.2f%% sparsity in %.0f s", len(report.layers), 100 * report.sparsity, report.seconds)
    if refine:
        summary = refine_summary(report.refine)
        log.info("SDS: mean relative layer error %.4g (first round) -> %.4g (refined), %d fallbacks, %.0f s in refinement",
                 summary["mean_error"]["first"], summary["mean_error_used"], summary["fallbacks"], summary["seconds"])
    return report
