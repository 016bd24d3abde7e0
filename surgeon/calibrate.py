"""Run calibration batches through a model; the only module that registers hooks.

The sequential driver needs three things from a forward pass: the inputs of decoder layer 0
(captured with a pre-hook that stops the pass with :class:`StopForward`, a dedicated exception),
the outputs of one layer given its inputs (:func:`run_layer`), and the second moments of the inputs
of each linear inside a layer (:func:`input_moments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon.adapters import Adapter
from surgeon.curvature.activations import SecondMoment


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted inputs are recorded."""


@dataclass
class LayerBatch:
    """One calibration batch as it enters a decoder layer."""

    hidden: torch.Tensor  # [B, T, hidden]
    kwargs: dict[str, Any] = field(default_factory=dict)  # attention mask, rotary embeddings, ...


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int = 8
) -> list[LayerBatch]:
    """Inputs (hidden states and keyword arguments) of decoder layer 0 for every batch of ``windows`` ``[N, T]``."""
    first = adapter.decoder_layers(model)[0]
    captured: list[LayerBatch] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        captured.append(LayerBatch(hidden.detach(), rest))
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    """Outputs of ``layer`` for each batch, packaged as the next layer's inputs."""
    return [LayerBatch(_hidden(layer(b.hidden, **b.kwargs)), b.kwargs) for b in batches]


@torch.no_grad()
def input_moments(
    layer: nn.Module,
    adapter: Adapter,
    batches: list[LayerBatch],
    groups: tuple[tuple[str, ...], ...] | None = None,
) -> dict[str, SecondMoment]:
    """Second moment ``A`` of the inputs of the linears in ``layer`` (keyed by name in the layer).

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator: one hook per group.
    ``groups`` limits the statistics to some input groups (default: all of ``adapter.input_groups``).
    """
    moments: dict[str, SecondMoment] = {}
    handles = []
    for group in groups if groups is not None else adapter.input_groups:
        lead = layer.get_submodule(group[0])
        moment = SecondMoment(lead.in_features, device=lead.weight.device)
        for name in group:
            moments[name] = moment
        handles.append(lead.register_forward_hook(lambda _m, args, _out, acc=moment: acc.update(args[0])))
    try:
        for b in batches:
            layer(b.hidden, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    return moments
