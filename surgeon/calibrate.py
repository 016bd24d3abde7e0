"""Run calibration batches through a model: layer inputs, per-layer outputs, input moments, K-FAC factors.

The sequential driver needs three things from a forward pass: the inputs of decoder layer 0
(captured with a pre-hook that stops the pass with :class:`StopForward`, a dedicated exception),
the outputs of one layer given its inputs (:func:`run_layer`), and the second moments of the inputs
of each linear inside a layer (:func:`input_moments`). LLM Surgeon needs the Kronecker factors of
every linear from forward and backward passes of the language-model loss: of the whole model at
once (:func:`kfac_factors`), or one layer at a time for streamed pruning (:func:`layer_forward`
stores each layer's inputs on the way up, :func:`head_gradient` starts the backward pass at the LM
head, :func:`layer_kfac` recomputes one layer from its stored inputs and pushes the gradient
through it). Both use :func:`head_gradient`, so the two give the same factors.

In a process group (:mod:`base.distributed`) the functions that take ``windows`` run this rank's
batches of them (:func:`~base.distributed.batches_of`: the batches one process forms, dealt
round-robin), and those that take batches are given this rank's; every statistic they return adds
the batches of all ranks in their global order (:func:`~base.distributed.over_batches`), so each
rank gets, bit for bit, what one process computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from base.adapters import Adapter
from base.distributed import batches_of, over_batches
from surgeon.curvature.activations import SecondMoment
from surgeon.curvature.kfac import KronFactor


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted inputs are recorded."""


@dataclass
class LayerBatch:
    """One calibration batch as it enters decoder layer ``index``.

    ``layer_kwargs`` holds the keyword arguments the model's own forward pass hands each decoder layer
    (attention mask, rotary embeddings, ...), captured once per batch: they differ between layers where
    layer types differ (Gemma 2/3 and Qwen2's sliding and full attention, Gemma 3's local and global
    RoPE), so layer ``i`` must be run with layer ``i``'s. Layers of one type share the same tensors.
    """

    hidden: torch.Tensor  # [B, T, hidden]
    layer_kwargs: tuple[dict[str, Any], ...] = ()  # per decoder layer
    index: int = 0  # the decoder layer this batch enters

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the layer this batch enters."""
        return self.layer_kwargs[self.index] if self.layer_kwargs else {}

    def at(self, index: int, hidden: torch.Tensor) -> LayerBatch:
        """The same batch entering layer ``index`` with ``hidden``."""
        return LayerBatch(hidden, self.layer_kwargs, index)

    def then(self, hidden: torch.Tensor) -> LayerBatch:
        """The next layer's input: this layer's output ``hidden``."""
        return self.at(self.index + 1, hidden)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int = 8,
    ranges: list[tuple[int, int]] | None = None,
) -> list[LayerBatch]:
    """Inputs of decoder layer 0 for every batch of ``windows`` ``[N, T]`` (of this rank's share of them in a
    process group; ``ranges``: these window ranges instead), with the keyword arguments the model hands
    each decoder layer.

    The model's own forward pass runs with every decoder layer replaced by a recorder that passes its
    input through: the embeddings, masks and rotary embeddings are computed as the model computes them
    (per layer type), and no decoder layer runs, so the layers may be on the meta device (streaming).
    """
    layers = list(adapter.decoder_layers(model))
    hidden0: list[torch.Tensor] = []
    per_layer: list[dict[str, Any]] = []

    def recorder(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden0.append(hidden.detach())
            per_layer.append({k: v for k, v in kwargs.items() if k not in LAYER_STATE_KWARGS})
            if index == len(layers) - 1:
                raise StopForward
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ finds it before the class's
    device = next(p for p in model.parameters() if not p.is_meta).device
    captured: list[LayerBatch] = []
    try:
        for lo, hi in ranges if ranges is not None else batches_of(int(windows.shape[0]), batch_size):
            try:
                model(input_ids=windows[lo:hi].to(device), use_cache=False)
            except StopForward:
                pass
            if len(per_layer) != len(layers):
                raise RuntimeError(f"the model ran {len(per_layer)} of its {len(layers)} decoder layers")
            captured.append(LayerBatch(hidden0.pop(), tuple(per_layer)))
            per_layer.clear()
    finally:
        for layer in layers:
            del layer.forward
    return captured


LAYER_STATE_KWARGS = ("hidden_states", "past_key_values", "use_cache")  # not calibration inputs: no cache is kept


@torch.no_grad()
def layerwise_differences(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> list[float]:
    """How far the layer-at-a-time path departs from the model's own forward pass, per decoder layer.

    Every layer-wise method (and streamed LLM Surgeon) computes its statistics by running one decoder
    layer at a time from captured inputs (:func:`capture_layer_inputs`, :func:`run_layer`). This runs
    ``ids`` ``[B, T]`` both ways as one batch and returns, for each layer, the largest absolute difference
    of its outputs relative to the largest output: 0.0 where the paths agree exactly, as they must.
    """
    layers = list(adapter.decoder_layers(model))
    reference: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: reference.append(_hidden(out).detach()))
               for layer in layers]
    try:
        model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    batches = capture_layer_inputs(model, adapter, ids, batch_size=int(ids.shape[0]))
    out = []
    for layer, ref in zip(layers, reference, strict=True):
        batches = run_layer(layer, batches)
        scale = float(ref.abs().max()) or 1.0
        out.append(float((batches[0].hidden - ref).abs().max()) / scale)
    return out


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    """Outputs of ``layer`` for each batch, packaged as the next layer's inputs.

    Consumes ``batches``: the list is emptied as it goes, so each batch's input is freed once its
    output exists and the layer boundary's activations are held about once, not twice.
    """
    out = []
    batches.reverse()
    while batches:
        b = batches.pop()
        out.append(b.then(_hidden(layer(b.hidden, **b.kwargs))))
    return out


@torch.no_grad()
def input_moments(
    layer: nn.Module,
    adapter: Adapter,
    batches: list[LayerBatch],
    groups: tuple[tuple[str, ...], ...] | None = None,
    *,
    diagonal: bool = False,
) -> dict[str, SecondMoment]:
    """Second moment ``A`` of the inputs of the linears in ``layer`` (keyed by name in the layer).

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator: one hook per group.
    ``groups`` limits the statistics to some input groups (default: all of ``adapter.input_groups``);
    ``diagonal`` keeps only ``diag(A)`` (Wanda).
    """
    moments: dict[str, SecondMoment] = {}
    handles = []
    for group in groups if groups is not None else adapter.input_groups:
        lead = layer.get_submodule(group[0])
        moment = SecondMoment(lead.in_features, device=lead.weight.device, diagonal=diagonal, dtype=lead.weight.dtype)
        for name in group:
            moments[name] = moment
        handles.append(lead.register_forward_hook(lambda _m, args, _out, acc=moment: acc.update(args[0])))
    try:
        for b in over_batches(batches, moments.values()):  # every rank's batches, in their global order
            layer(b.hidden, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    return moments


FisherKind = Literal["empirical", "true"]
HEAD_CHUNK = 1 << 23  # logits per LM-head chunk: 32 MiB in float32, whatever the vocabulary


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states ``[..., H]``: logits ``[..., V]`` (Gemma 2/3's final soft cap too)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # the order of the family's own forward: divide, tanh, multiply
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


def final_hidden(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """What the decoder does after its last layer (the final norm; OPT's projection): ``[B, T, H]`` in and out."""
    for name in adapter.final:
        module: Any = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if module is not None:
            hidden = module(hidden)
    return hidden


def head_gradient(
    model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, *, fisher: FisherKind = "empirical",
    gen: torch.Generator | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """Gradient of the summed next-token NLL with respect to the final hidden states, head in token chunks.

    The logits of a chunk of ``chunk // V`` tokens at a time (``chunk``: :data:`HEAD_CHUNK` logits) are formed, their cross-entropy summed and
    differentiated, and dropped: the vocabulary ``V`` never sits in memory for every token at once
    (4 x 512 tokens x 49,152 logits were 400 MB per copy; 128k-256k vocabularies 1-2 GB).

    Args:
        hidden: ``[B, T, H]`` output of the decoder's final norm (:func:`final_hidden`).
        ids: ``[B, T]`` token ids; position t predicts ``ids[:, t + 1]`` (empirical Fisher), or a label
            sampled from the model's own distribution with ``gen`` (true Fisher).

    Returns:
        ``[B, T, H]``, zero at the last position (it predicts nothing).
    """
    B, T, H = hidden.shape
    rows = hidden.detach()[:, :-1].reshape(-1, H)  # [B*(T-1), H]
    labels = ids[:, 1:].reshape(-1)
    step = max(1, (chunk or HEAD_CHUNK) // model.get_output_embeddings().out_features)
    grads = []
    with torch.enable_grad():
        for start in range(0, rows.shape[0], step):
            h = rows[start : start + step].detach().requires_grad_()  # [C, H]
            logits = head_logits(model, h)  # [C, V]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # the loss in at least float32
            if fisher == "empirical":
                y = labels[start : start + step]
            else:
                probs = torch.softmax(logits.detach(), dim=-1).cpu()
                y = torch.multinomial(probs, 1, generator=gen).reshape(-1).to(logits.device)
            loss = F.cross_entropy(logits, y, reduction="sum")
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss while estimating curvature")
            loss.backward()
            grads.append(h.grad)
    grad = torch.cat(grads).reshape(B, T - 1, H)
    return torch.cat([grad, grad.new_zeros(B, 1, H)], dim=1)


def kfac_factors(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    fisher: FisherKind = "empirical",
    seed: int = 0,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> dict[str, KronFactor]:
    """Kronecker factors ``A`` (inputs) and ``G`` (output gradients) of every decoder linear (of the linears
    ``names``, names in a layer, when given: the others' moments are not formed).

    Real forward and backward passes of the language-model loss over ``windows`` ``[N, T]``
    (ALGORITHMS.md, notation). The loss is the *sum* of next-token NLLs, so each token's output
    gradient enters ``G`` at the same scale in every layer. ``fisher="empirical"`` uses the data's
    next tokens as labels; ``"true"`` samples labels from the model's own predictive distribution.
    The LM head runs a chunk of tokens at a time (:func:`head_gradient`), as in the streamed walk.
    Memory is ``O(d_in² + d_out²)`` per linear; batches stream. Linears sharing an input share one
    ``A`` tensor. The true Fisher's labels are drawn per batch from ``seed`` and the batch's first
    window, so a rank's batches draw what one process draws for them.

    Returns:
        ``{module name: KronFactor(A [d_in, d_in], G [d_out, d_out])}``, float64 means per token.
    """
    mine = batches_of(int(windows.shape[0]), batch_size, "K-FAC windows")
    linears = _wanted(model, adapter, names)
    A_acc, handles = _hook_inputs(model, adapter, names)
    G_acc = {name: SecondMoment(m.out_features, device=m.weight.device, dtype=m.weight.dtype)
             for name, m in linears.items()}
    for name, module in linears.items():
        handles.append(module.register_full_backward_hook(
            lambda _m, _gin, gout, acc=G_acc[name]: acc.update(gout[0])
        ))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # Gradients must flow through the linears' outputs, not into the weights: make the
    # embeddings' output require grad so autograd builds the graph without weight gradients.
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    try:
        rounds = over_batches(mine, [*A_acc.values(), *G_acc.values()])  # every rank's batches, in global order
        for lo, hi in tqdm(rounds, total=len(mine), desc=f"K-FAC ({fisher} Fisher)", unit="batch", disable=not progress):
            batch = windows[lo:hi].to(device)  # [B, T]
            hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state  # [B, T, H]
            gen = torch.Generator().manual_seed(seed * 1_000_003 + lo) if fisher == "true" else None
            hidden.backward(head_gradient(model, hidden, batch, fisher=fisher, gen=gen))
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    A = finalize_shared(A_acc)
    return {name: KronFactor(A=A[name], G=G_acc[name].finalize()) for name in linears}


@torch.no_grad()
def input_factors(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Second moment ``A`` ``[d_in, d_in]`` of the inputs of every decoder linear (of ``names``, names in a
    layer, and the members of their input groups), forward passes only."""
    mine = batches_of(int(windows.shape[0]), batch_size)
    A_acc, handles = _hook_inputs(model, adapter, names)
    device = next(model.parameters()).device
    try:
        rounds = over_batches(mine, A_acc.values())  # every rank's batches, in global order
        for lo, hi in tqdm(rounds, total=len(mine), desc="input statistics", unit="batch", disable=not progress):
            model(input_ids=windows[lo:hi].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return finalize_shared(A_acc)


@torch.no_grad()
def layer_forward(
    layer: nn.Module, adapter: Adapter, batches: list[LayerBatch], moment_batches: int = 0, *, moments: bool = False,
) -> tuple[list[LayerBatch], dict[str, SecondMoment]]:
    """Outputs of ``layer`` for each batch, and with ``moments`` the input moments ``A`` of its linears over
    the first ``moment_batches`` batches (keyed by name in the layer; linears sharing an input share one).

    In a process group every rank takes part when ``moments`` is set, with or without batches of its own:
    the moments add every rank's first batches in their global order (:func:`~base.distributed.over_batches`).
    """
    outputs: list[LayerBatch] = []
    active = [True]
    accs, handles = _moment_hooks(layer, adapter.input_groups, active) if moments else ({}, [])
    try:
        for b in over_batches(batches[:moment_batches], accs.values()) if moments else ():
            outputs.append(b.then(_hidden(layer(b.hidden, **b.kwargs))))
        active[0] = False
        for b in batches[len(outputs):]:
            outputs.append(b.then(_hidden(layer(b.hidden, **b.kwargs))))
    finally:
        for h in handles:
            h.remove()
    return outputs, accs


def _moment_hooks(layer: nn.Module, groups: Iterable[Sequence[str]],
                  active: list[bool] | None = None) -> tuple[dict[str, SecondMoment], list]:
    """Forward hooks adding each input group's input into one :class:`SecondMoment`, keyed by every member's
    name (while ``active[0]``, when given), and their handles."""
    moments: dict[str, SecondMoment] = {}
    handles = []
    for group in groups:
        lead = layer.get_submodule(group[0])
        acc = SecondMoment(lead.in_features, device=lead.weight.device, dtype=lead.weight.dtype)
        moments.update(dict.fromkeys(group, acc))
        handles.append(lead.register_forward_hook(
            lambda _m, args, _out, acc=acc: acc.update(args[0]) if active is None or active[0] else None))
    return moments, handles


def layer_kfac(
    layer: nn.Module, adapter: Adapter, batches: list[LayerBatch], grads: list[torch.Tensor], *, inputs: bool = True,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, SecondMoment], dict[str, SecondMoment], list[torch.Tensor]]:
    """One layer's share of :func:`kfac_factors`: activation checkpointing at layer granularity.

    The layer's forward pass is recomputed from its stored inputs ``batches`` and the gradient with
    respect to its outputs (``grads``, ``[B, T, H]`` per batch, from the layer above or
    :func:`head_gradient`) is pushed through it: hooks collect ``G`` of the linears ``names`` (names in
    the layer; default: every linear) and, with ``inputs``, ``A`` of their input groups, exactly as in
    the whole model's backward pass. In a process group these are this rank's batches, and every rank
    takes part (with or without batches): the factors add every rank's in their global order.

    Returns:
        ``(A, G, input_grads)``: moments keyed by name in the layer (``A`` empty without ``inputs``),
        and the gradient with respect to the layer's input for each batch (the layer below's ``grads``).
    """
    wanted = list(names) if names is not None else list(adapter.linear_names)
    A: dict[str, SecondMoment] = {}
    handles: list = []
    if inputs:
        A, handles = _moment_hooks(layer, _input_groups(adapter, wanted))
    G: dict[str, SecondMoment] = {}
    for name in wanted:
        linear = adapter.linear(layer, name)
        G[name] = SecondMoment(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        handles.append(linear.register_full_backward_hook(lambda _m, _gin, gout, acc=G[name]: acc.update(gout[0])))
    requires = [p.requires_grad for p in layer.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)  # gradients through the activations only, none into the weights
    input_grads = []
    try:
        with torch.enable_grad():
            for b, g in over_batches(list(zip(batches, grads, strict=True)), [*A.values(), *G.values()]):
                x = b.hidden.detach().requires_grad_()  # [B, T, H]
                torch.autograd.backward(_hidden(layer(x, **b.kwargs)), g)
                input_grads.append(x.grad)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(layer.parameters(), requires):
            p.requires_grad_(r)
    return A, G, input_grads


def _wanted(model: nn.Module, adapter: Adapter, names: Sequence[str] | None) -> dict[str, nn.Linear]:
    """The decoder linears (full names) whose name in their layer is one of ``names`` (None: all)."""
    linears = adapter.decoder_linears(model)
    if names is None:
        return linears
    full = {f"{adapter.layers}.{i}.{n}" for i in range(len(adapter.decoder_layers(model))) for n in names}
    return {n: m for n, m in linears.items() if n in full}


def _input_groups(adapter: Adapter, names: Sequence[str] | None) -> list[Sequence[str]]:
    """The input groups holding one of ``names`` (names in a layer; None: every group)."""
    return list(adapter.input_groups) if names is None else [g for g in adapter.input_groups
                                                              if any(n in names for n in g)]


def _hook_inputs(model: nn.Module, adapter: Adapter,
                 names: Sequence[str] | None = None) -> tuple[dict[str, SecondMoment], list]:
    """:func:`_moment_hooks` on every decoder layer (the input groups of ``names``), keyed by full name."""
    A_acc: dict[str, SecondMoment] = {}
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        moments, hooks = _moment_hooks(layer, _input_groups(adapter, names))
        A_acc.update({f"{adapter.layers}.{index}.{member}": acc for member, acc in moments.items()})
        handles += hooks
    return A_acc, handles


def finalize_shared(accs: dict[str, SecondMoment], *, consume: bool = False) -> dict[str, torch.Tensor]:
    """Finalize accumulators, returning one tensor per shared accumulator (no copies; ``consume``: not even
    of the running sums, which are spent)."""
    done: dict[int, torch.Tensor] = {}
    for acc in accs.values():
        if id(acc) not in done:
            done[id(acc)] = acc.finalize(consume=consume)
    return {name: done[id(acc)] for name, acc in accs.items()}
