"""Where the prunable linears live in each supported model family.

One small declarative description per family; every other module asks this one where
q/k/v/o/gate/up/down are, so no driver is copied per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class Adapter:
    """Module layout of a decoder-only family (names relative to the model root)."""

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Names of the prunable linears inside one decoder layer, in execution order."""
        a, m = self.attn, self.mlp
        return (
            f"{a}.{self.q}", f"{a}.{self.k}", f"{a}.{self.v}", f"{a}.{self.o}",
            f"{m}.{self.gate}", f"{m}.{self.up}", f"{m}.{self.down}",
        )

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears of one layer that read the same input tensor (one input statistic serves each group)."""
        a, m = self.attn, self.mlp
        return (
            (f"{a}.{self.q}", f"{a}.{self.k}", f"{a}.{self.v}"), (f"{a}.{self.o}",),
            (f"{m}.{self.gate}", f"{m}.{self.up}"), (f"{m}.{self.down}",),
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return model.get_submodule(self.layers)  # type: ignore[return-value]

    def decoder_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear of the decoder, keyed by its full module name."""
        out: dict[str, nn.Linear] = {}
        for i, layer in enumerate(self.decoder_layers(model)):
            for name in self.linear_names:
                out[f"{self.layers}.{i}.{name}"] = layer.get_submodule(name)
        return out


LLAMA = Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"))
ADAPTERS: tuple[Adapter, ...] = (LLAMA,)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for a config's ``model_type``; a clear error for anything else."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise SurgeonError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
