"""SDS (sparse-dense-sparse) refinement of one linear layer, on exact calibration statistics.

ALGORITHMS.md, "SDS". For each linear, with the dense (original) weights ``W0``, the dense model's
inputs ``X`` (teacher stream) and the pruned model's inputs ``X~`` (student stream; the sequential
driver's inputs, which carry the error of the layers already pruned), the layer-wise
reconstruction loss of weights ``W`` is

    f(W) = ||W X~ - W0 X||^2 / N = tr(W A W^T) - 2 tr(W B^T) + y,

with ``A = X~ X~^T / N`` (the student's second moment), ``B = W0 C``, ``C = X X~^T / N`` (the
cross moment) and ``y = ||W0 X||^2 / N``. Everything below works on these three statistics, so one
"epoch" over all calibration tokens costs one ``[d_out, d_in] x [d_in, d_in]`` product however
many tokens there are, and the optimisation is exact full-batch gradient descent.

1. *Sparse*: the first-round weights ``W1`` come from the one-shot pruner.
2. *Dense*: starting from ``W1`` with every weight re-activated, FISTA (accelerated proximal
   gradient) on ``f(W) + d (l2 ||W - W0||^2 + 2 l1 s ||W||_1)``, where ``d = mean diag A`` and
   ``s = mean |W0|`` make the regulariser scale-free: at the optimum a weight is exactly zero
   when its loss gradient at zero is below about ``l1 s`` times its curvature, so small weights
   settle at zero and the dense weights take a pruning-friendly shape.
3. *Sparse again*: the same pruner on the dense weights and ``A``, then the soft adjustment: a few
   projected-gradient steps on ``f + d l2 ||W - W0||^2`` over the kept weights only (the mask stays
   fixed). The ridge matters here as in SparseGPT's 1% damping: without it the adjustment fitted
   nearly dead input channels with huge weights that did not generalise (SparseGPT 2:4 + SDS came
   out at perplexity 1344 on the default model).

The layer's relative error ``f(W) / y`` is measured after each step. The same soft adjustment is
also applied to ``W1`` on its own mask, and the linear keeps whichever of the three (the SDS
result, the adjusted first round, ``W1`` itself) has the lowest error; anything non-finite is
discarded (logged). The ridge of both FISTA runs pulls toward the dense weights ``W0``, as
SparseGPT's damping does, not toward zero: directions the calibration inputs barely excite then
keep the dense layer's behaviour. Pulling toward zero instead shrank them and, although the
calibration error fell, lost on test text (SparseGPT 2:4 + SDS 92.24 against 78.51 alone, the
adjustment alone 82.11; anchored at ``W0``: 77.23 and 68.63).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from base.adapters import Adapter
from base.distributed import OrderedSum, over_batches
from base.errors import SurgeonError
from surgeon.baselines.common import Target
from surgeon.calibrate import LayerBatch, _hidden
from surgeon.curvature.activations import SecondMoment, calibration_positions

log = logging.getLogger(__name__)

LayerPruner = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SDSConfig:
    """Hyper-parameters of the refinement (defaults measured on SmolLM2-135M, see docs/sds.md)."""

    l1: float = 0.1  # L1 weight, in units of mean |W0| x mean diag(A)
    l2: float = 0.01  # ridge toward the dense weights, in units of mean diag(A) (SparseGPT's 1% damping)
    epochs: int = 100  # dense-step FISTA iterations (each one full pass over the statistics)
    adjust_epochs: int = 100  # soft mask adjustment: projected-gradient iterations after re-pruning
    # The target each linear reconstructs: "self", the dense weights on the linear's own inputs
    # (the paper's layer-wise distillation); "layer", the dense layer run on the pruned model's
    # stream (also corrects errors made earlier in the same layer); "dense", the dense model's own
    # activations (also corrects the error of the layers before).
    teacher: Literal["self", "layer", "dense"] = "self"

    def __post_init__(self) -> None:
        for name in ("l1", "l2"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise SurgeonError(f"SDS {name} must be a finite number >= 0, got {value}")
        if self.teacher not in ("self", "layer", "dense"):
            raise SurgeonError(f"SDS teacher must be self, layer or dense, got {self.teacher!r}")
        for name in ("epochs", "adjust_epochs"):
            if getattr(self, name) < 0:
                raise SurgeonError(f"SDS {name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairStats:
    """Statistics of one linear's inputs on the student and teacher streams."""

    A: torch.Tensor  # [d_in, d_in] student second moment (float64)
    C: torch.Tensor  # [d_in, d_in] cross moment, teacher inputs x student inputs (float64)
    y: float  # mean squared norm of the teacher linear's output per token
    tokens: int


def self_stats(A: torch.Tensor, W0: torch.Tensor, tokens: int) -> PairStats:
    """Statistics for the ``"self"`` teacher: the dense weights on the linear's own inputs (``C = A``)."""
    W = W0.double()
    return PairStats(A, A, float(((W @ A) * W).sum()), tokens)


class _Cross(OrderedSum):
    """Running ``sum x_t^T x_s`` over tokens (float32 products per batch, float64 sum in the batches' order)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        super().__init__((dim, dim), device, torch.float32)

    def update(self, x_t: torch.Tensor, x_s: torch.Tensor) -> None:
        x_t, x_s = (calibration_positions(x.detach()).reshape(-1, x.shape[-1]).float() for x in (x_t, x_s))
        prod = x_t.T @ x_s
        if not torch.isfinite(prod).all():
            raise FloatingPointError("non-finite values in calibration activations")
        self.add(prod)


@torch.no_grad()
def pair_moments(
    student: nn.Module,
    teacher: nn.Module,
    adapter: Adapter,
    s_batches: list[LayerBatch],
    t_batches: list[LayerBatch],
    groups: tuple[tuple[str, ...], ...],
    *,
    teacher_outputs: bool = False,
) -> tuple[dict[str, PairStats], list[LayerBatch] | None]:
    """:class:`PairStats` of every linear in ``groups`` of decoder layer ``student`` / ``teacher``.

    Batch by batch, the teacher layer runs on the teacher stream and the student layer on the
    student stream (same windows, so tokens pair up); in a process group each rank runs its own
    batches and the statistics add every rank's batches in their global order
    (:func:`~base.distributed.over_batches`). With ``teacher_outputs`` the teacher layer's outputs
    are returned as the next layer's teacher stream (the same forward pass).
    """
    if student is teacher:
        raise ValueError("the teacher layer must be a separate module (a copy of the dense layer)")
    seen: dict[tuple[str, str], torch.Tensor] = {}
    names = [name for group in groups for name in group]
    batch_energy = torch.zeros(len(names), dtype=torch.float64)  # [linears], this batch's ||W0 x||^2
    energy = OrderedSum([len(names)], dtype=torch.float64)  # and over the batches, with the token count
    moments: dict[tuple[str, ...], SecondMoment] = {}
    cross: dict[tuple[str, ...], _Cross] = {}
    handles = []
    for group in groups:
        lead = student.get_submodule(group[0])
        moments[group] = SecondMoment(lead.in_features, device=lead.weight.device, dtype=lead.weight.dtype)
        cross[group] = _Cross(lead.in_features, lead.weight.device)
        handles.append(lead.register_forward_hook(
            lambda _m, args, _o, key=("s", group[0]): seen.__setitem__(key, args[0])))
        handles.append(teacher.get_submodule(group[0]).register_forward_hook(
            lambda _m, args, _o, key=("t", group[0]): seen.__setitem__(key, args[0])))
        for name in group:
            handles.append(teacher.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, i=names.index(name): batch_energy.__setitem__(
                    i, float(calibration_positions(out).double().pow(2).sum()))))
    outputs: list[LayerBatch] = []
    sums = [*moments.values(), *cross.values(), energy]
    try:
        for s_b, t_b in over_batches(list(zip(s_batches, t_batches, strict=True)), sums):
            batch_energy.zero_()
            out = teacher(t_b.hidden, **t_b.kwargs)
            if teacher_outputs:
                outputs.append(t_b.then(_hidden(out)))
            student(s_b.hidden, **s_b.kwargs)
            for group in groups:
                x_s, x_t = seen.pop(("s", group[0])), seen.pop(("t", group[0]))
                moments[group].update(x_s)
                cross[group].update(x_t, x_s)
            energy.add(batch_energy.clone(), calibration_positions(s_b.hidden).numel() // s_b.hidden.shape[-1])
    finally:
        for h in handles:
            h.remove()
    tokens = energy.count
    stats = {}
    for group in groups:
        A, C = moments[group].finalize(), cross[group].sum / tokens
        for name in group:
            stats[name] = PairStats(A, C, float(energy.sum[names.index(name)]) / tokens, tokens)
    return stats, (outputs if teacher_outputs else None)


def relative_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, y: float) -> float:
    """``f(W) / y``: the layer's output error against the dense layer on the dense stream."""
    W = W.double()
    f = float(((W @ A) * W).sum() - 2 * (W * B).sum() + y)
    return max(f, 0.0) / y if y > 0 else 0.0


def _fista(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    steps: int,
    *,
    ridge: float = 0.0,
    anchor: torch.Tensor | None = None,
    threshold: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accelerated proximal gradient on ``tr(W A W^T) - 2 tr(W B^T) + ridge ||W - anchor||^2 + 2 threshold ||W||_1``.

    ``anchor`` (default zero) is where the ridge pulls: the dense weights, in SDS, as in SparseGPT's
    damping, so directions the calibration inputs never excite keep the dense layer's behaviour.

    Activations have outlier channels, so ``A`` is badly conditioned; the iteration runs in the
    Jacobi-scaled variables ``V = W diag(A + ridge I)^(1/2)`` (unit-diagonal curvature; the L1 term
    becomes a per-column threshold). With ``mask`` the iterate stays on the kept weights (pruned
    weights stay zero).
    """
    if steps == 0:
        return W
    M = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    diag = M.diagonal().clamp_min(1e-30)
    scale = diag.rsqrt()  # W = V * scale (per column)
    if anchor is not None and ridge > 0:  # ridge ||W - anchor||^2 = ridge ||W||^2 - 2 tr(W (ridge anchor)^T) + const
        B = B + ridge * anchor.to(B.dtype)
    M_s = M * scale[:, None] * scale[None, :]
    t = 1.0 / (2 * float(torch.linalg.eigvalsh(M_s)[-1]))
    M32, B32 = M_s.float(), (B * scale).float()
    cut = (2 * t * threshold * scale).float()  # per-column soft threshold
    x = (W.double() / scale).float()
    keep = mask.to(torch.float32) if mask is not None else None
    z, momentum = x.clone(), 1.0
    for _ in range(steps):
        nxt = z - t * 2 * (z @ M32 - B32)
        if threshold > 0:
            nxt = torch.sign(nxt) * torch.clamp(nxt.abs() - cut, min=0)
        if keep is not None:
            nxt = nxt * keep
        following = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        z = nxt + ((momentum - 1) / following) * (nxt - x)
        x, momentum = nxt, following
    return (x.double() * scale).to(W.dtype)


def refine_linear(
    W0: torch.Tensor,
    W1: torch.Tensor,
    stats: PairStats,
    target: Target,
    reprune: LayerPruner,
    cfg: SDSConfig,
    name: str = "weight",
) -> tuple[torch.Tensor, dict]:
    """SDS steps 2 and 3 for one linear: returns the refined weights and a record of the errors.

    Args:
        W0: dense (original) weights ``[d_out, d_in]``.
        W1: first-round pruned weights (same shape).
        stats: statistics from :func:`pair_moments`.
        target: what ``reprune`` removes (the first round's sparsity or N:M pattern).
        reprune: a layer-wise pruner ``(W, A, n_tokens, target) -> (W_new, keep)``.
    """
    start = time.perf_counter()
    A, y = stats.A, stats.y
    B = W0.double() @ stats.C
    d = float(A.diagonal().mean())
    s = float(W0.abs().mean())
    ridge = cfg.l2 * d
    record: dict = {"first": relative_error(W1, A, B, y)}
    dense = _fista(W1, A, B, cfg.epochs, ridge=ridge, anchor=W0, threshold=cfg.l1 * s * d)
    record["dense"] = relative_error(dense, A, B, y)
    pruned, keep = reprune(dense, A, stats.tokens, target)
    record["reprune"] = relative_error(pruned, A, B, y)
    final = _fista(pruned, A, B, cfg.adjust_epochs, ridge=ridge, anchor=W0, mask=keep)
    record["final"] = relative_error(final, A, B, y)
    # The same adjustment on the first round's own mask: the new mask has to beat it to be used.
    adjusted = _fista(W1, A, B, cfg.adjust_epochs, ridge=ridge, anchor=W0, mask=W1 != 0)
    record["adjusted"] = relative_error(adjusted, A, B, y)
    record["seconds"] = time.perf_counter() - start
    candidates = [(record["first"], "first", W1)]
    for err, choice, W in ((record["final"], "sds", final), (record["adjusted"], "first mask", adjusted)):
        if math.isfinite(err) and bool(torch.isfinite(W).all()):
            candidates.append((err, choice, W))
        else:
            log.warning("SDS %s: the %s gave non-finite weights; discarded", name,
                        "refinement" if choice == "sds" else "adjustment of the first-round mask")
    err, choice, W = min(candidates, key=lambda c: c[0])
    record.update(used=err, choice=choice, fallback=choice == "first")
    if choice != "sds":
        kept = "first-round mask, adjusted" if choice == "first mask" else "first-round weights"
        log.info("SDS %s: keeping the %s (error %.4g; the re-pruned mask's %.4g)", name, kept, err, record["final"])
    return W, record
