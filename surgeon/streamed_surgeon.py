"""LLM Surgeon one decoder layer at a time: the same shots, costs, selection and updates as
:func:`surgeon.llm_surgeon.prune_surgeon_`, with the curvature collected layer by layer.

K-FAC's ``G`` of a linear in layer l needs the backward pass of every layer above it. Each shot
therefore walks the layers three times, with one layer in memory at a time (``stream``, e.g.
:class:`export.streaming.StreamedLayers`) and everything else in the spill directory:

1. **forward**: the calibration batches go up through the layers (weights as the previous shot left
   them); each layer's input hidden states are written to ``hidden-{l}``. With ``--kfac-samples``
   below the windows, ``A`` of every linear comes from all windows here, forward only (``A-{l}``).
2. **head**: the final norm and the LM head turn the last hidden states into the loss and its
   gradient, the logits formed a token chunk at a time (:func:`surgeon.calibrate.head_gradient`).
3. **reverse**: from the last layer down, the layer's forward pass is recomputed from its stored
   input and the incoming gradient pushed through it (activation checkpointing at layer
   granularity, :func:`surgeon.calibrate.layer_kfac`): ``A`` and ``G`` of its linears, and the
   gradient for the layer below (``grad-{l}``). The backward pass sees every layer with the shot's
   starting weights, as the whole-model pass does, so the factors are the same.

Then each layer's removals are chosen and its weights updated with the shared step functions of
:mod:`surgeon.llm_surgeon`. Where a layer decides alone (N:M, ``--allocation uniform``) that happens
at once in the reverse walk, after the layer passed its gradient down. A global allocation needs
every layer's costs first: the reverse walk writes each linear's element costs (``costs-{l}``) or
the layer's coupled-group candidates (``candidates-{l}.json``) and the factors the update will need
(``factors-{l}``; with output-side group costs just o's and down's damped ``A^-1``, ``inverses-{l}``:
1.1 GB a Llama-2-7B layer, not 1.4); **select** then finds the global threshold in a few passes over the costs on disk
(:func:`surgeon.prune.threshold.global_threshold`: exact radix selection, one linear in memory) or
ranks the candidates, and **update** walks the layers once more, applying the selection with each
layer's factors read back. Each shot's weights and masks go to ``state-{shot}-{l}``; the next shot
starts from them. **finish** writes each layer's final weights to the stream (the checkpoint shard).

Resume: ``state.json`` (a :class:`base.resume.ResumeState`) names the shot, the phase and how many
layers of it are done, and the checksum of every file the walk still needs; every step writes its
files first (atomically) and the state after, so a kill at any moment reruns at most the step it
interrupted, from files that are whole, and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from base.adapters import Adapter
from base.distributed import (
    assign,
    batches_of,
    broadcast_json,
    gather_rows,
    local_world_size,
    rank,
    share,
    sum_over_ranks,
    world_size,
)
from base.env import PeakWindow
from base.errors import SurgeonError
from base.resume import ResumeState
from base.surgery import LayerPlan, RemovalPlan
from surgeon import structures
from surgeon.calibrate import (
    LayerBatch,
    capture_layer_inputs,
    final_hidden,
    finalize_shared,
    head_gradient,
    layer_forward,
    layer_kfac,
)
from surgeon.curvature.kfac import DampedKron, KronFactor, LazyDamped
from surgeon.driver import LayerStream, PruneReport
from surgeon.llm_surgeon import (
    Remaining,
    SurgeonConfig,
    Target,
    binding_of,
    element_costs_of,
    element_prune_,
    factor_names,
    is_local,
    layer_candidates,
    output_side,
    structured_budget,
    surgeon_cost,
    uniform_choice,
)
from surgeon.prune.threshold import GlobalThreshold, global_threshold

log = logging.getLogger(__name__)

STATE = "state.json"
STATE_VERSION = 3  # 2: base.resume (the pieces' checksums); 3: masks as bits, the last states in the stream's dtype
PHASES = ("forward", "head", "reverse", "select", "update", "done")  # a shot's, in order (select, update: global)


@dataclass
class _Batches:
    """The calibration batches the forward walk carries, and which of them feed what.

    ``A`` batches (the first ``a_count``) are every window in ``batch_size`` batches when ``A`` comes
    from more windows than ``G`` (or for Wanda's scores: ``moments``); the K-FAC batches (``kfac``:
    indices into the carried batches, with their token ids) are the whole-model K-FAC pass's batches.
    Where they coincide they are carried once; a ragged last K-FAC batch is carried on its own. In a
    process group these are this rank's batches (:func:`~base.distributed.batches_of`), possibly none.
    """

    first: list[LayerBatch]  # inputs of layer 0
    a_count: int
    kfac: list[int]
    ids: list[torch.Tensor]  # token ids of each K-FAC batch [B, T]
    starts: list[int]  # index of each K-FAC batch's first window (seeds the true Fisher's labels)
    moments: bool = False  # the forward walk collects A (on every rank, whatever its batches)


def _batches(model: nn.Module, adapter: Adapter, windows: torch.Tensor, cfg: SurgeonConfig) -> _Batches:
    bs, n = cfg.batch_size, int(windows.shape[0])
    if cfg.scoring == "magnitude":
        return _Batches([], 0, [], [], [])
    mine = batches_of(n, bs)
    if cfg.scoring == "wanda":
        first = capture_layer_inputs(model, adapter, windows, ranges=mine)
        return _Batches(first, len(first), [], [], [], moments=True)
    n_k = n if cfg.kfac_windows is None else min(cfg.kfac_windows, n)
    kfac = batches_of(n_k, bs, "K-FAC windows")
    ids, starts = [windows[lo:hi] for lo, hi in kfac], [lo for lo, _ in kfac]
    if n_k == n:  # A and G from the same windows: A in the reverse walk, as in the whole-model pass
        return _Batches(capture_layer_inputs(model, adapter, windows, ranges=mine), 0, list(range(len(kfac))), ids, starts)
    ragged = [r for r in kfac if r not in mine]  # a last K-FAC batch shorter than batch_size: carried on its own
    first = capture_layer_inputs(model, adapter, windows, ranges=mine + ragged)
    index = [mine.index(r) if r in mine else len(mine) + ragged.index(r) for r in kfac]
    return _Batches(first, len(mine), index, ids, starts, moments=True)


def _save_factors(spill: ResumeState, adapter: Adapter, i: int, factors: dict[str, KronFactor],
                  names: list[str]) -> None:
    """``A`` (once per input group) and ``G`` of the named linears of layer ``i``."""
    tensors = {f"G.{n}": factors[n].G for n in names}
    for group in _groups(adapter, i):
        used = [n for n in group if n in names]
        if used:
            tensors[f"A.{group[0]}"] = factors[used[0]].A
    spill.put_tensors(f"factors-{i}.safetensors", tensors)


def _load_factors(spill: ResumeState, adapter: Adapter, i: int) -> dict[str, KronFactor]:
    tensors = spill.tensors(f"factors-{i}.safetensors")
    return {n: KronFactor(tensors[f"A.{group[0]}"], tensors[f"G.{n}"])
            for group in _groups(adapter, i) for n in group if f"G.{n}" in tensors}


def _groups(adapter: Adapter, i: int) -> list[list[str]]:
    """Full names of layer ``i``'s linears, by shared input."""
    return [[f"{adapter.layers}.{i}.{n}" for n in group] for group in adapter.input_groups]


class _Walk:
    """One streamed LLM Surgeon run: the layer walks of every shot, resumable (module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, windows: torch.Tensor | None, cfg: SurgeonConfig,
                 stream: LayerStream, spill: Path, progress: bool) -> None:
        self.model, self.adapter, self.cfg, self.stream = model, adapter, cfg, stream
        self.windows = windows if windows is not None else torch.zeros(0, 0, dtype=torch.long)
        self.progress = progress
        self.n = stream.num_layers
        self.linears = adapter.decoder_linears(model)  # meta tensors where streamed: shapes only
        self.sizes = {name: m.weight.numel() for name, m in self.linears.items()}
        self.targets = cfg.shot_targets()
        self.root = spill  # removed at the end; in a process group each rank walks in a directory of its own
        if world_size() > 1:  # its own batches' hidden states and gradients (ranks may not share a disk)
            spill = spill / f"rank-{rank()}-of-{world_size()}"
        self.spill = ResumeState.open(spill, STATE, STATE_VERSION, binding_of(cfg, self.linears, self.windows,
                                                                             {"streamed": True}))
        self.state = self.spill.data  # the walk's own fields, saved with the spill's pieces
        if self.spill.resumed:
            log.info("resuming streamed LLM Surgeon at shot %d, %s, after %d layers", self.state["shot"] + 1,
                     self.state["phase"], self.state["done"])
        else:
            self.state.update(shot=0, phase="forward", done=0, shots=[], removed={}, seconds={}, layer_seconds={},
                              layer_rss={})
        self.batches: _Batches | None = None
        self.window: PeakWindow | None = None  # the peak memory of the current layer step

    # -- state --
    def _save_state(self, **changes: Any) -> None:
        self.spill.save(**changes)

    @staticmethod
    def _sync() -> None:
        """Wait for every rank (a no-op in one process): called after a step's files are written and before
        the state says it is done, so no rank's state is ever more than one step ahead of another's."""
        sum_over_ranks([0])

    def _position(self) -> tuple[int, int, int]:
        return self.state["shot"], PHASES.index(self.state["phase"]), self.state["done"]

    def _agree(self) -> bool:
        """Bring every rank to the same step before a resumed walk goes on (a no-op in one process).

        A rank killed between the barrier of a step and its state is one step behind the others, whose
        files of that step are still there (a step's inputs are forgotten a step late): the ranks ahead
        go back to it and every rank redoes it. A rank left at the end of a shot (``done``) whose
        others began the next one ends its shot alone (that takes no collective): True for that rank.
        """
        if world_size() == 1:
            return False
        rows = [tuple(int(v) for v in row) for row in gather_rows(self._position())]
        behind = min(rows)
        if behind[0] != max(rows)[0]:
            if max(rows)[0] != behind[0] + 1 or any(r[0] == behind[0] and r[1] != PHASES.index("done") for r in rows) \
                    or any(r[0] > behind[0] and r[1:] != (0, 0) for r in rows):
                raise SurgeonError(f"the ranks' streamed LLM Surgeon walks are too far apart to resume together "
                                   f"(shot, phase, layers done per rank: {rows}); remove {self.root} and start again")
            return self._position()[0] == behind[0]  # those at the end of the earlier shot finish it alone
        if self._position() != behind:
            log.info("rank %d goes back to shot %d, %s after %d layers, where rank %d stopped", rank(), behind[0] + 1,
                     PHASES[behind[1]], behind[2], rows.index(behind))
            self._save_state(phase=PHASES[behind[1]], done=behind[2])
        return False

    def _layer_done(self, i: int, seconds: float) -> None:
        """Record the step on layer ``i`` as done: its time, and its peak memory (the largest of any step
        on that layer; the window opens when the step enters the layer)."""
        key = str(i)
        self.state["layer_seconds"][key] = self.state["layer_seconds"].get(key, 0.0) + seconds
        if self.window is not None:
            self.state["layer_rss"][key] = max(self.state["layer_rss"].get(key, 0.0), self.window.peak_mib())
        self._sync()
        self._save_state(done=self.state["done"] + 1)

    # -- layers --
    def _names(self, i: int) -> list[str]:
        return [f"{self.adapter.layers}.{i}.{n}" for n in self.adapter.linear_names]

    def _enter(self, i: int, shot: int) -> tuple[nn.Module, dict[str, nn.Linear], dict[str, torch.Tensor]]:
        """Layer ``i`` with the weights the first ``shot`` shots left, its linears and keep-masks."""
        self.window = PeakWindow()
        layer = self.stream.enter(i)
        for p in layer.parameters():
            p.requires_grad_(False)
        linears = {full: self.adapter.linear(layer, n) for full, n in zip(self._names(i), self.adapter.linear_names)}
        if shot == 0:
            return layer, linears, {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in linears.items()}
        saved = self.spill.tensors(f"state-{shot}-{i}.safetensors")
        with torch.no_grad():
            for name, m in linears.items():
                m.weight.copy_(saved[f"{name}.weight"])
        return layer, linears, {n: _unpack(saved[f"{n}.keep"], m.weight.shape) for n, m in linears.items()}

    def _leave(self, i: int, layer: nn.Module, shot: int, linears: dict[str, nn.Linear],
               keep: dict[str, torch.Tensor] | None) -> None:
        """Write layer ``i``'s weights and masks after ``shot`` shots (``keep`` None: unchanged), release it.

        The masks as bits; the weights in float32 for the next shot. After the last shot only rank 0 keeps
        them (it writes the checkpoint; :meth:`_finish` sends the other ranks its records), in the dtype the
        stream writes them in (the shard holds that rounding, made once either way): a bfloat16 7B model's
        final states are 13.8 GB on one rank, not 32 GB (float32 and byte masks) on each."""
        last = shot == len(self.targets)
        if keep is not None:
            self.state["removed"][str(i)] = sum(int((~k).sum()) for k in keep.values())
            if not last or rank() == 0:
                dtype = self.stream.dtype if last and self.stream.dtype is not None else torch.float32
                tensors = {f"{n}.weight": m.weight.to(dtype) for n, m in linears.items()}
                tensors.update({f"{n}.keep": _pack(k) for n, k in keep.items()})
                self.spill.put_tensors(f"state-{shot}-{i}.safetensors", tensors)
        self.stream.leave(i, layer, None)

    def _hidden(self, i: int, which: list[int] | None = None) -> list[LayerBatch]:
        """The stored inputs of layer ``i`` (``n``: the last layer's outputs) for the carried batches ``which``."""
        assert self.batches is not None
        which = which if which is not None else list(range(len(self.batches.first)))
        saved = self.spill.tensors(f"hidden-{i}.safetensors", [str(j) for j in which])
        return [self.batches.first[j].at(i, saved[str(j)]) for j in which]

    def _tqdm(self, it: Any, desc: str) -> Any:
        return tqdm(it, desc=desc, unit="layer", disable=not self.progress)

    # -- phases of one shot --
    def _forward(self, shot: int, target: Target) -> None:
        """Up through the layers: store each layer's input; ``A`` from all windows; baselines score here."""
        assert self.batches is not None
        cfg, b = self.cfg, self.batches
        carry: list[LayerBatch] = []
        calibrated = cfg.scoring != "magnitude"  # (in a process group a rank may have no batch of its own)
        if calibrated:
            if self.state["done"] == 0:
                carry = b.first
                self.spill.put_tensors("hidden-0.safetensors", {str(j): x.hidden for j, x in enumerate(carry)})
            else:
                carry = self._hidden(self.state["done"])
        for i in self._tqdm(range(self.state["done"], self.n), f"shot {shot + 1}: forward"):
            t0 = time.perf_counter()
            layer, linears, keep = self._enter(i, shot)
            A: dict[str, torch.Tensor] = {}
            if calibrated:
                carry, moments = layer_forward(layer, self.adapter, carry, b.a_count, moments=b.moments)
                A = {f"{self.adapter.layers}.{i}.{n}": a for n, a in finalize_shared(moments, consume=True).items()}
                del moments
            changed = None
            if cfg.scoring != "surgeon":
                found = layer_candidates(self.model, self.adapter, i, keep, cfg, None, A or None)
                if is_local(target, cfg):
                    structures.apply_(self.model, self.adapter, self._uniform(found, target), None, keep)
                    changed = keep
                else:
                    self.spill.put_json(f"candidates-{i}.json", [_candidate(c) for c in found])
            elif A:
                self.spill.put_tensors(f"A-{i}.safetensors", {f"A.{g[0]}": A[g[0]] for g in _groups(self.adapter, i)})
            if calibrated:
                self.spill.put_tensors(f"hidden-{i + 1}.safetensors", {str(j): x.hidden for j, x in enumerate(carry)})
            self._leave(i, layer, shot + 1, linears, changed)
            del layer, linears, keep, A
            self._layer_done(i, time.perf_counter() - t0)

    def _head(self) -> None:
        """The loss at the LM head and its gradient with respect to the last layer's outputs."""
        assert self.batches is not None
        b = self.batches
        grads = {}
        for j, x, ids, start in zip(b.kfac, self._hidden(self.n, b.kfac), b.ids, b.starts, strict=True):
            h_in = x.hidden.detach().requires_grad_()
            # the true Fisher's labels: the whole-model pass's generator for this batch (seed 0)
            gen = torch.Generator().manual_seed(start) if self.cfg.fisher == "true" else None
            with torch.enable_grad():
                h = final_hidden(self.model, self.adapter, h_in)  # [B, T, H]
                h.backward(head_gradient(self.model, h.detach(), ids, fisher=self.cfg.fisher, gen=gen))
            grads[str(j)] = h_in.grad
        self.spill.put_tensors(f"grad-{self.n}.safetensors", grads)

    def _reverse(self, shot: int, target: Target) -> None:
        """Down through the layers: ``A``/``G`` per layer; local targets pruned at once, global ones scored."""
        assert self.batches is not None
        cfg, b = self.cfg, self.batches
        lam_G = cfg.damping_G(target)
        needs = factor_names(self.adapter, target, self.cfg)
        for i in self._tqdm(range(self.n - 1 - self.state["done"], -1, -1), f"shot {shot + 1}: reverse"):
            t0 = time.perf_counter()
            layer, linears, keep = self._enter(i, shot)
            saved = self.spill.tensors(f"grad-{i + 1}.safetensors", [str(j) for j in b.kfac])
            A_mom, G_mom, grads = layer_kfac(layer, self.adapter, self._hidden(i, b.kfac),
                                             [saved[str(j)] for j in b.kfac], inputs=not b.moments, names=needs)
            del saved
            prefix = f"{self.adapter.layers}.{i}."
            if b.moments:
                A_saved = self.spill.tensors(f"A-{i}.safetensors")
                A = {n: A_saved[f"A.{g[0]}"] for g in _groups(self.adapter, i) for n in g}
            else:
                A = {prefix + n: a for n, a in finalize_shared(A_mom, consume=True).items()}
            factors = {prefix + n: KronFactor(A[prefix + n], G_mom[n].finalize(consume=True)) for n in needs}
            del A_mom, G_mom, A
            # structured output-side costs: only o and down, each prepared once; nothing reads the factors after
            consume = output_side(target, self.cfg)
            damped = LazyDamped(factors, cfg.lam_A, lam_G, cache=2, consume=consume)
            if consume:
                factors = {}
            changed = None
            if isinstance(target, Remaining):
                found = self._candidates(i, keep, damped)
                if is_local(target, cfg):
                    self._apply(i, linears, self._uniform(found, target), damped, keep)
                    changed = keep
                else:
                    self.spill.put_json(f"candidates-{i}.json", [_candidate(c) for c in found])
                    if consume:  # the update moves o's and down's columns: A_inv is all it reads
                        self.spill.put_tensors(f"inverses-{i}.safetensors",
                                               {n: damped[n].A_inv for n in self._mine(i, target)})
                    else:
                        _save_factors(self.spill, self.adapter, i, factors, self._mine(i, target))
            elif is_local(target, cfg):
                self._element_prune(linears, target, damped, keep)
                changed = keep
            else:
                self.spill.put_tensors(f"costs-{i}.safetensors", self._element_costs(linears, damped, keep))
                _save_factors(self.spill, self.adapter, i, factors, self._mine(i, target))
            del damped, factors
            self.spill.put_tensors(f"grad-{i}.safetensors", {str(j): g for j, g in zip(b.kfac, grads, strict=True)})
            self._leave(i, layer, shot + 1, linears, changed)
            del layer, linears, keep, grads
            # a step late: a rank that goes back one step (_agree) still finds the gradient it started from
            self.spill.forget(f"grad-{i + 2}.safetensors")  # removed once the state no longer names it
            self._layer_done(i, time.perf_counter() - t0)

    # -- one layer's work, split between the ranks (all of it rank 0's in one process) --
    def _parts(self, i: int) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Layer ``i``'s structured work in two parts, the MLP channels and the heads: the linears each moves
        and its owner (split by the linears' cost, :func:`~base.distributed.assign`)."""
        names = structures.LayerNames.of(self.adapter, i)
        parts = {"channel": [*names.channel_rows, names.down], "heads": [names.q, *names.kv, names.o]}
        return parts, assign({k: sum(surgeon_cost(self.linears[n]) for n in v) for k, v in parts.items()})

    def _element_owners(self, linears: dict[str, nn.Linear]) -> dict[str, int]:
        return assign({n: surgeon_cost(m) for n, m in linears.items()})

    def _mine(self, i: int, target: Target) -> list[str]:
        """The linears of layer ``i`` whose factors this rank's share of the update reads."""
        needs = [f"{self.adapter.layers}.{i}.{n}" for n in factor_names(self.adapter, target, self.cfg)]
        if isinstance(target, Remaining):
            parts, owners = self._parts(i)
            return [n for n in needs if any(n in parts[k] for k in parts if owners[k] == rank())]
        owners = self._element_owners({n: self.linears[n] for n in self._names(i)})
        return [n for n in needs if owners[n] == rank()]

    def _candidates(self, i: int, keep: dict[str, torch.Tensor], damped: LazyDamped) -> list[structures.Candidate]:
        """Layer ``i``'s coupled groups and their costs, each part's computed by its owner and shared."""
        parts, owners = self._parts(i)
        mine = tuple(k for k in parts if owners[k] == rank())
        costs = structures.group_costs(self.model, self.adapter, i, "surgeon", damped, None, self.cfg.group_cost, mine)
        sizes = {"channel": self.linears[parts["channel"][-1]].in_features,
                 "heads": self.adapter.head_layout(self.model.config)[0]}
        shared = {k: [c.to(torch.float64).contiguous() if c is not None else torch.empty(sizes[k], dtype=torch.float64)]
                  for k, c in zip(parts, costs, strict=True)}
        share(shared, owners)
        return layer_candidates(self.model, self.adapter, i, keep, self.cfg,
                                costs=(shared["channel"][0], shared["heads"][0]))

    def _apply(self, i: int, linears: dict[str, nn.Linear], chosen: list[structures.Candidate],
               damped: Mapping[str, DampedKron] | None, keep: dict[str, torch.Tensor]) -> None:
        """Remove the ``chosen`` groups of layer ``i``: each part by its owner, its linears then shared."""
        parts, owners = self._parts(i)
        if damped is None:  # the baselines only zero: every rank alike
            structures.apply_(self.model, self.adapter, chosen, None, keep)
            return
        structures.apply_(self.model, self.adapter, [c for c in chosen if owners[c.kind] == rank()], damped, keep,
                          self.cfg.group_cost)
        moved = [k for k in parts if any(c.kind == k for c in chosen)]
        share({n: [linears[n].weight.data, keep[n]] for k in moved for n in parts[k]},
              {n: owners[k] for k in moved for n in parts[k]})

    def _element_prune(self, linears: dict[str, nn.Linear], target: Target, damped: LazyDamped,
                       keep: dict[str, torch.Tensor], cut: GlobalThreshold | None = None) -> None:
        owners = self._element_owners(linears)
        element_prune_({n: m for n, m in linears.items() if owners[n] == rank()}, target, damped, keep,  # type: ignore[arg-type]
                       self.cfg, cut)
        share({n: [m.weight.data, keep[n]] for n, m in linears.items()}, owners)

    def _element_costs(self, linears: dict[str, nn.Linear], damped: LazyDamped,
                       keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every linear's element costs (each computed by its owner, then shared: every rank selects alike)."""
        owners = self._element_owners(linears)
        costs = dict(element_costs_of({n: m for n, m in linears.items() if owners[n] == rank()}, damped, keep))
        costs = {n: costs.get(n, torch.empty(m.weight.shape, dtype=torch.float64)) for n, m in linears.items()}
        share({n: [c] for n, c in costs.items()}, owners)
        return costs

    def _uniform(self, found: list[structures.Candidate], target: Target) -> list[structures.Candidate]:
        assert isinstance(target, Remaining)
        return uniform_choice(found, structured_budget(self.linears, target), self.n)

    def _select(self, target: Target) -> None:
        """The global allocation, from every layer's costs or candidates on disk."""
        if isinstance(target, Remaining):
            candidates = [_uncandidate(i, c) for i in range(self.n)
                          for c in self.spill.load_json(f"candidates-{i}.json")]
            chosen = structures.select(candidates, structured_budget(self.linears, target))
            self._save_state(phase="update", done=0, chosen=[_candidate(c, layer=True) for c in chosen])
            return

        def costs() -> Iterator[tuple[str, torch.Tensor]]:
            for i in range(self.n):
                yield from self.spill.tensors(f"costs-{i}.safetensors").items()

        cut = global_threshold(costs, self.sizes, target, self.cfg.max_layer_sparsity)  # type: ignore[arg-type]
        self._save_state(phase="update", done=0, cut={"value": cut.value, "capped": cut.capped})

    def _update(self, shot: int, target: Target) -> None:
        """Apply the global selection layer by layer, with each layer's factors read back."""
        cfg = self.cfg
        for i in self._tqdm(range(self.state["done"], self.n), f"shot {shot + 1}: update"):
            t0 = time.perf_counter()
            layer, linears, keep = self._enter(i, shot)
            damped: Mapping[str, DampedKron] | None = None
            if cfg.scoring == "surgeon" and output_side(target, self.cfg):
                empty = torch.empty(0)  # column updates read A_inv alone (structures.apply_)
                damped = {n: DampedKron(empty, empty, A_inv, empty)
                          for n, A_inv in self.spill.tensors(f"inverses-{i}.safetensors").items()}
            elif cfg.scoring == "surgeon":
                damped = LazyDamped(_load_factors(self.spill, self.adapter, i), cfg.lam_A, cfg.damping_G(target), cache=2)
            if isinstance(target, Remaining):
                chosen = [_uncandidate(c["layer"], c) for c in self.state["chosen"] if c["layer"] == i]
                self._apply(i, linears, chosen, damped, keep)
            else:
                assert damped is not None
                cut = GlobalThreshold(self.state["cut"]["value"], self.state["cut"]["capped"])
                self._element_prune(linears, target, damped, keep, cut)
            self._leave(i, layer, shot + 1, linears, keep)
            del layer, linears, keep, damped
            # a step late, as the gradients: a rank that goes back one step still finds what it read. Without
            # this the 7B shape kept all 32 layers' down A^-1 (31 GB of float64) to the end of the shot.
            self.spill.forget(f"inverses-{i - 1}.safetensors", f"factors-{i - 1}.safetensors")
            self._layer_done(i, time.perf_counter() - t0)

    def _write(self, i: int, report: PruneReport) -> dict:
        """Layer ``i``'s final weights to the stream; its records (zeros counted, removal plan, time, peak)."""
        layer, linears, keep = self._enter(i, len(self.targets))
        records: dict[str, Any] = {"layers": {}, "refine": {}, "shots": self.state["shots"],
                                   "seconds": self.state["layer_seconds"].get(str(i), 0.0),
                                   "peak_rss_mib": self.state["layer_rss"].get(str(i))}
        for name, m in linears.items():
            report.record(name, m)
            records["layers"][name] = report.layers[name]
        if self.cfg.structured is not None:
            plan = structures.layer_removal(self.model.config, self.adapter, i, keep)
            records["removal"] = plan.to_dict() if plan is not None else None
        self.stream.leave(i, layer, records)
        return records

    def _finish(self, report: PruneReport) -> None:
        """Each layer's final weights to the stream (the checkpoint, rank 0's), with its records (sent to
        every rank: the others kept no final states)."""
        removal = RemovalPlan()
        for i in self._tqdm(range(self.n), "write"):
            done = broadcast_json(0, (self.stream.finished(i) or self._write(i, report)) if rank() == 0 else None)
            report.layers.update(done["layers"])
            report.layer_seconds.append(done["seconds"])
            report.layer_peak_rss_mib.append(done["peak_rss_mib"] or 0.0)
            if done.get("removal"):
                removal.layers[i] = LayerPlan.of(**done["removal"])
            report.shots = done["shots"]  # the same in every layer's records: they outlive the spill directory
        if self.cfg.structured is not None:
            report.removal = removal.to_dict()

    # -- the run --
    def run(self) -> PruneReport:
        cfg = self.cfg
        start = time.perf_counter()
        report = PruneReport(config=cfg.to_dict())
        total = sum(self.sizes.values())
        # Every layer written already: killed after the walk removed its spill directory; only the end is left.
        written = all(self.stream.finished(i) for i in range(self.n))  # the same on every rank (rank 0's stream)
        alone = False if written else self._agree()
        first = len(self.targets) if written else self.state["shot"]
        if first < len(self.targets):
            self.batches = _batches(self.model, self.adapter, self.windows, cfg)
        for shot in range(first, len(self.targets)):
            target = self.targets[shot]
            t0 = time.perf_counter()
            surgeon = cfg.scoring == "surgeon"
            if self.state["phase"] == "forward":
                self._forward(shot, target)
                self._save_state(phase="head" if surgeon else "select", done=0)
            if self.state["phase"] == "head":
                self._head()
                self._save_state(phase="reverse", done=0)
            if self.state["phase"] == "reverse":
                self._reverse(shot, target)
                self._save_state(phase="select", done=0)
            t_curv = time.perf_counter() - t0
            if self.state["phase"] == "select":
                if is_local(target, cfg):  # every layer was pruned on the way
                    self._save_state(phase="done", done=0)
                else:
                    self._select(target)
            if self.state["phase"] == "update":
                self._update(shot, target)
                self._save_state(phase="done", done=0)
            if not alone:  # no rank forgets the shot's files while another may still go back into it
                self._sync()
            alone = False
            self.state["seconds"][str(shot)] = self.state["seconds"].get(str(shot), 0.0) + time.perf_counter() - t0
            removed = sum(self.state["removed"].values()) / total
            self.state["shots"].append({
                "shot": shot + 1, "target": target if isinstance(target, float) else str(target),
                "sparsity": removed, "curvature_seconds": round(t_curv, 1),
                "seconds": round(self.state["seconds"][str(shot)], 1),
            })
            log.info("shot %d/%d: sparsity %.2f%% (%.0f s, streamed)", shot + 1, len(self.targets), 100 * removed,
                     self.state["seconds"][str(shot)])
            self.spill.forget(f"state-{shot}-*", "hidden-*", "grad-*", "A-*", "costs-*", "factors-*", "inverses-*",
                             "candidates-*")
            self._save_state(shot=shot + 1, phase="forward", done=0, removed={}, cut=None, chosen=None)
        self._finish(report)
        report.seconds = time.perf_counter() - start
        self._sync()  # every layer written (by rank 0) before any rank's spill directory goes
        shutil.rmtree(self.spill.directory, ignore_errors=True)
        if self.root != self.spill.directory:
            self._sync()
            if rank() == 0:
                shutil.rmtree(self.root, ignore_errors=True)
        return report


def _pack(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits, eight to a byte (the first element in the lowest bit)."""
    flat = keep.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The mask of ``shape`` that :func:`_pack` packed."""
    flat = (bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return flat.flatten()[:shape.numel()].view(shape).bool()


def _candidate(c: structures.Candidate, layer: bool = False) -> dict:
    out = {"kind": c.kind, "index": c.index.tolist(), "cost": c.cost, "size": c.size}
    return {"layer": c.layer, **out} if layer else out


def _uncandidate(i: int, d: dict) -> structures.Candidate:
    return structures.Candidate(i, d["kind"], torch.tensor(d["index"], dtype=torch.long), d["cost"], d["size"])


def prune_surgeon_streamed_(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor | None, cfg: SurgeonConfig, stream: LayerStream,
    spill: Path, *, progress: bool = True,
) -> PruneReport:
    """LLM Surgeon (and the structured baselines) one layer at a time; the same result as
    :func:`surgeon.llm_surgeon.prune_surgeon_` (``tests/test_streamed_surgeon.py``).

    Args:
        model: the model, its decoder layers possibly on the meta device (``stream`` reads them).
        windows: calibration token ids ``[N, T]`` (None for magnitude scores).
        stream: where the layers come from; each gets its final weights through ``stream.leave``.
        spill: a directory for the walk's files (hidden states, gradients, costs, factors, each shot's
            weights) and its resume state; removed when the run ends.
    """
    if cfg.refine is not None or cfg.between_shots is not None:
        raise SurgeonError("SDS refinement and low-rank updates between shots do not run streamed yet; use --no-streaming")
    if cfg.structured is not None:
        structures.check_supported(model, adapter)
    if cfg.pattern is not None:
        for name, m in adapter.decoder_linears(model).items():
            cfg.pattern.check_shape(m.in_features, name)
    if windows is None and cfg.scoring != "magnitude":
        raise SurgeonError("LLM Surgeon needs calibration windows")
    requires = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in requires:
        p.requires_grad_(False)  # gradients through activations only: none into the LM head or norms
    try:
        return _Walk(model, adapter, windows, cfg, stream, spill, progress).run()
    finally:
        for p, r in requires:
            p.requires_grad_(r)


def spill_bytes(model: nn.Module, adapter: Adapter, cfg: SurgeonConfig, windows: int, seq_len: int,
                ranks: int | None = None, dtype: torch.dtype | None = None, checkpoint: int = 0) -> int:
    """The most disk the walk's files take on this machine, ``ranks`` ranks (default: torchrun's
    ``LOCAL_WORLD_SIZE``) each with a spill directory of its own (docs/streaming.md, "Scratch disk");
    with the ``checkpoint``'s bytes, the run's peak (the checkpoint is written beside the last states).

    The boundary hidden states and two gradients, float32, every window once (``(L + 3) N T H``); each
    layer's state after a shot per rank, its masks as bits and its weights in float32 (``4.125 P``), after
    the last shot on rank 0 alone in ``dtype``, the checkpoint's (None: float32); the previous shot's too, until the
    update ends; and, under global allocation, each layer's curvature from the reverse walk until the
    update has read it (freed a layer late): down's and o's damped ``A^-1`` in float64 for structured
    output-side costs, else an upper bound of every factor and the element costs (``8 (d_in² + d_out² +
    d_in d_out)`` per linear). The peak is the larger of the reverse walk's end and the update's end, plus
    one layer step's pieces (the update's first state is written while every layer's curvature is still
    there; the 7B run measured 38.17 GB against 37.65 GB without this term).
    """
    ranks = ranks or local_world_size()
    linears = adapter.decoder_linears(model)
    layers = len(adapter.decoder_layers(model))
    hidden = 4 * (layers + 3) * windows * seq_len * int(model.config.hidden_size)
    params = sum(m.in_features * m.out_features for m in linears.values())
    final = (torch.empty(0, dtype=dtype or torch.float32).element_size() + 0.125) * params  # rank 0's alone
    between = 4.125 * params * ranks  # a state the next shot starts from
    before = between if cfg.shots > 1 else 0  # the previous shot's, read by this one
    written = between if cfg.shots > 2 else final  # the states of the shot that writes the most
    states = before + written
    if cfg.allocation == "uniform" or (cfg.pattern is not None and cfg.structured is None and cfg.sparsity is None):
        curvature = 0  # each layer pruned on the way: nothing waits for the update
    elif cfg.structured is not None and cfg.group_cost == "output":
        ends = (f".{adapter.channel_cols[0]}", f".{adapter.head_cols[0]}")
        curvature = sum(8 * m.in_features ** 2 for n, m in linears.items() if n.endswith(ends))
    else:
        curvature = sum(8 * (m.in_features ** 2 + m.out_features ** 2 + m.in_features * m.out_features)
                        for m in linears.values())
    late = 2 * curvature // layers  # the last two layers' curvature, still there when the update ends
    step = (curvature + written) // layers  # one layer step's pieces on their way (the update's first beside all)
    return int(max(hidden + max(curvature + before, states + late) + step, final + checkpoint))
