"""Decoder-only language models whose layers differ in size, on top of transformers' own modules.

After structured pruning (ALGORITHMS.md, "Structured removal in a decoder layer") each decoder
layer has its own MLP width and its own numbers of query and key/value heads; hidden size,
``head_dim`` and vocabulary are unchanged. This file describes such a model for each supported
family: a config (``model_type`` ``surgeon_<family>``) that lists the sizes of every layer, and a
causal LM that builds each layer with the family's own transformers class from a copy of the config
holding that layer's sizes. No forward pass is copied from transformers.

Config fields added to the family's config:

- ``layer_intermediate_sizes``: MLP width of each layer (the family's ``intermediate_size``;
  ``ffn_dim`` in OPT);
- ``layer_num_attention_heads`` and ``layer_num_key_value_heads``: query and KV heads of each layer
  (equal in OPT, which has no grouped-query attention);
- ``head_dim``: explicit, never recomputed from hidden size and heads;
- ``surgeon_format_version``: the format of these fields (newer versions are refused);
- ``per_layer_config``: the same sizes in transformers' own format for heterogeneous configs
  (``transformers.integrations.heterogeneity``: zero-padded layer index -> the attributes that layer
  sets), written explicitly for every layer so other tools can read the shapes without our field
  names; on reading it must agree with the lists above, and it is then set aside so that
  transformers does not treat the config as heterogeneous (its stock modules would refuse to read
  ``intermediate_size`` from it).

The global ``intermediate_size``/``num_attention_heads``/``num_key_value_heads`` keep the values of
the unpruned model; the per-layer lists are what every layer is built from.

This file imports only torch and transformers, so a checkpoint can ship a copy of it for
``trust_remote_code=True``; with surgeon-export installed, ``import surgeon`` registers the same
classes with ``AutoConfig`` and ``AutoModelForCausalLM`` and no code from a checkpoint runs. Being
standalone, it owns what the rest of surgeon-export reads from it: the ``surgeon_`` model-type prefix
(:data:`MODEL_TYPE_PREFIX`), :class:`LayerShape` and the one reader of per-layer sizes from a config
(:func:`config_layer_shapes`). Which stock model types use which class is said by each family's
adapter (``base/adapters.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FORMAT_VERSION = 1
MODEL_TYPE_PREFIX = "surgeon_"  # model_type of a per-layer-shape variant: the prefix, then the stock model_type
LAYER_FIELDS = ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads")


def stock_model_type(model_type: str) -> str:
    """The stock model type of a ``surgeon_*`` one (a stock one unchanged)."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX)


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer: MLP width, query heads, key/value heads."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def to_dict(self) -> dict[str, int]:
        return {
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
        }


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_layer_shapes(config: Any, intermediate_key: str = "intermediate_size",
                        grouped_kv: bool = True) -> list[LayerShape]:
    """Every decoder layer's sizes as a config gives them: its per-layer lists (:data:`LAYER_FIELDS`)
    where it has them, else the global sizes in every layer. ``ValueError`` names a bad field.

    Args:
        config: a transformers config (stock or ``surgeon_*``) or its ``config.json`` as a dict.
        intermediate_key: the family's config field for the MLP width (``ffn_dim`` in OPT).
        grouped_kv: False where the family has one key/value head per query head (OPT).

    Example:
        >>> config_layer_shapes({"num_hidden_layers": 2, "intermediate_size": 8, "num_attention_heads": 4,
        ...                      "num_key_value_heads": 2, "layer_intermediate_sizes": [8, 5]})[1]
        LayerShape(intermediate_size=5, num_attention_heads=4, num_key_value_heads=2)
    """
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    n = get("num_hidden_layers")
    if not _positive(n):
        raise ValueError(f"config field num_hidden_layers must be a positive integer, got {n!r}")
    heads = get("num_attention_heads")
    kv = (get("num_key_value_heads") or heads) if grouped_kv else heads
    columns = []
    for field, key, default in zip(LAYER_FIELDS, (intermediate_key, "num_attention_heads", "num_key_value_heads"),
                                   (get(intermediate_key), heads, kv)):
        value = get(field)
        if value is None:
            if not _positive(default):
                raise ValueError(f"config field {key} must be a positive integer, got {default!r}")
            value = [default] * n
        if not isinstance(value, list) or len(value) != n:
            raise ValueError(f"config field {field} must be a list of {n} sizes (one per layer), got {value!r}")
        if not all(_positive(x) for x in value):
            raise ValueError(f"config field {field} must hold positive integers, got {value!r}")
        columns.append(value)
    shapes = [LayerShape(*sizes) for sizes in zip(*columns)]
    for i, s in enumerate(shapes):
        if s.num_attention_heads % s.num_key_value_heads or (not grouped_kv
                                                             and s.num_attention_heads != s.num_key_value_heads):
            raise ValueError(f"config layer {i}: {s.num_attention_heads} query heads cannot be grouped over "
                             f"{s.num_key_value_heads} key/value heads")
    return shapes


def layer_fields(shapes: list[LayerShape]) -> dict[str, list[int]]:
    """The per-layer config fields (:data:`LAYER_FIELDS`) that describe ``shapes``."""
    return dict(zip(LAYER_FIELDS, ([s.intermediate_size for s in shapes], [s.num_attention_heads for s in shapes],
                                   [s.num_key_value_heads for s in shapes])))


class PerLayerConfigMixin:
    """Per-layer sizes on top of a family config; checked when the config is built."""

    intermediate_key = "intermediate_size"  # the family's name for the MLP width
    grouped_kv = True  # False: one KV head per query head (OPT)
    # Defaults for the added fields; the values given to a config are set on the instance.
    layer_intermediate_sizes: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    surgeon_format_version: int = FORMAT_VERSION

    def __post_init__(self, **kwargs: Any) -> None:
        given = kwargs.pop("per_layer_config", None)
        super().__post_init__(**kwargs)  # type: ignore[misc]
        cfg: Any = self
        cfg.surgeon_format_version = cfg.surgeon_format_version  # an instance value, so it is always saved
        if not isinstance(cfg.surgeon_format_version, int) or cfg.surgeon_format_version < 1:
            raise ValueError(f"config field surgeon_format_version must be a positive integer, got {cfg.surgeon_format_version!r}")
        if cfg.surgeon_format_version > FORMAT_VERSION:
            raise ValueError(
                f"surgeon_format_version {cfg.surgeon_format_version} is newer than this code supports "
                f"({FORMAT_VERSION}); upgrade surgeon-export"
            )
        if getattr(cfg, "head_dim", None) is None:
            # Only a config built without per-layer sizes lands here: the global head count is the
            # unpruned one, so this is the family's own head size.
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        for field, value in layer_fields(config_layer_shapes(self, self.intermediate_key, self.grouped_kv)).items():
            setattr(cfg, field, value)
        if given is not None and _normalised(given) != _normalised(self._per_layer_mapping()):
            raise ValueError("config field per_layer_config disagrees with layer_intermediate_sizes / "
                             "layer_num_attention_heads / layer_num_key_value_heads")

    def _per_layer_mapping(self) -> dict[str, dict[str, int]]:
        """Every layer's sizes in transformers' ``per_layer_config`` format (explicit for every layer)."""
        cfg: Any = self
        n = len(cfg.layer_intermediate_sizes)
        digits = len(str(n - 1))
        out = {}
        for i in range(n):
            sizes = {self.intermediate_key: cfg.layer_intermediate_sizes[i],
                     "num_attention_heads": cfg.layer_num_attention_heads[i]}
            if self.grouped_kv:
                sizes["num_key_value_heads"] = cfg.layer_num_key_value_heads[i]
            out[str(i).zfill(digits)] = sizes
        return out

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()  # type: ignore[misc]
        if getattr(self, "layer_intermediate_sizes", None) is not None:
            out["per_layer_config"] = self._per_layer_mapping()
        return out


def _normalised(mapping: Any) -> dict[int, dict[str, Any]]:
    """``per_layer_config`` keyed by int layer index (transformers accepts ``"07"``, ``"7"`` and ``7``)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"config field per_layer_config must be a mapping, got {mapping!r}")
    return {int(k): dict(v) for k, v in mapping.items()}


def layer_config(config: Any, index: int) -> Any:
    """A shallow copy of ``config`` holding layer ``index``'s own sizes."""
    out = copy.copy(config)
    setattr(out, config.intermediate_key, config.layer_intermediate_sizes[index])
    if config.grouped_kv:
        out.num_attention_heads = config.layer_num_attention_heads[index]
        out.num_key_value_heads = config.layer_num_key_value_heads[index]
    return out


class PerLayerModelMixin:
    """Rebuilds the decoder layers of a family's causal LM with each layer's own sizes."""

    layers_path = "model.layers"

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        model: Any = self
        layers: nn.ModuleList = model.get_submodule(self.layers_path)
        for index, old in enumerate(layers):
            cfg = layer_config(config, index)
            layer = type(old)(cfg, index)
            self._shape_attention(layer, config, index)
            # Forward passes read the attention implementation from ``module.config``: point every
            # module at the model's config so later changes (set_attn_implementation) reach them.
            for module in layer.modules():
                if getattr(module, "config", None) is cfg:
                    module.config = config
            layers[index] = layer
        model.post_init()  # initialises the new layers only (the others are marked initialised)

    def _shape_attention(self, layer: nn.Module, config: Any, index: int) -> None:
        """Hook for families whose attention cannot take its head counts from the config."""


class OPTPerLayerModelMixin(PerLayerModelMixin):
    """OPT derives head_dim from hidden size and heads, so its projections are built here."""

    layers_path = "model.decoder.layers"

    def _shape_attention(self, layer: nn.Module, config: Any, index: int) -> None:
        attn: Any = layer.get_submodule("self_attn")
        heads, hidden = config.layer_num_attention_heads[index], config.hidden_size
        width = heads * config.head_dim
        attn.num_heads = heads
        attn.head_dim = config.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, nn.Linear(hidden, width, bias=config.enable_bias))
        attn.out_proj = nn.Linear(width, hidden, bias=config.enable_bias)


class SurgeonLlamaConfig(PerLayerConfigMixin, LlamaConfig):
    model_type = "surgeon_llama"


class SurgeonMistralConfig(PerLayerConfigMixin, MistralConfig):
    model_type = "surgeon_mistral"


class SurgeonQwen2Config(PerLayerConfigMixin, Qwen2Config):
    model_type = "surgeon_qwen2"


class SurgeonQwen3Config(PerLayerConfigMixin, Qwen3Config):
    model_type = "surgeon_qwen3"


class SurgeonGemmaConfig(PerLayerConfigMixin, GemmaConfig):
    model_type = "surgeon_gemma"


class SurgeonGemma2Config(PerLayerConfigMixin, Gemma2Config):
    model_type = "surgeon_gemma2"


class SurgeonGemma3TextConfig(PerLayerConfigMixin, Gemma3TextConfig):
    model_type = "surgeon_gemma3_text"


class SurgeonOPTConfig(PerLayerConfigMixin, OPTConfig):
    model_type = "surgeon_opt"
    intermediate_key = "ffn_dim"
    grouped_kv = False
    head_dim: int | None = None


class SurgeonLlamaForCausalLM(PerLayerModelMixin, LlamaForCausalLM):
    config_class = SurgeonLlamaConfig


class SurgeonMistralForCausalLM(PerLayerModelMixin, MistralForCausalLM):
    config_class = SurgeonMistralConfig


class SurgeonQwen2ForCausalLM(PerLayerModelMixin, Qwen2ForCausalLM):
    config_class = SurgeonQwen2Config


class SurgeonQwen3ForCausalLM(PerLayerModelMixin, Qwen3ForCausalLM):
    config_class = SurgeonQwen3Config


class SurgeonGemmaForCausalLM(PerLayerModelMixin, GemmaForCausalLM):
    config_class = SurgeonGemmaConfig


class SurgeonGemma2ForCausalLM(PerLayerModelMixin, Gemma2ForCausalLM):
    config_class = SurgeonGemma2Config


class SurgeonGemma3ForCausalLM(PerLayerModelMixin, Gemma3ForCausalLM):
    config_class = SurgeonGemma3TextConfig


class SurgeonOPTForCausalLM(OPTPerLayerModelMixin, OPTForCausalLM):
    config_class = SurgeonOPTConfig


# Every per-layer causal LM (its config is its ``config_class``); the adapters say which stock model type uses which.
PER_LAYER_MODELS: tuple[Any, ...] = (
    SurgeonLlamaForCausalLM, SurgeonMistralForCausalLM, SurgeonQwen2ForCausalLM, SurgeonQwen3ForCausalLM,
    SurgeonGemmaForCausalLM, SurgeonGemma2ForCausalLM, SurgeonGemma3ForCausalLM, SurgeonOPTForCausalLM,
)


def register() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` know every ``surgeon_*`` model type (idempotent)."""
    for model_cls in PER_LAYER_MODELS:
        AutoConfig.register(model_cls.config_class.model_type, model_cls.config_class, exist_ok=True)
        AutoModelForCausalLM.register(model_cls.config_class, model_cls, exist_ok=True)
