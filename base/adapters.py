"""Where the prunable linears live in each supported model family, and how they are coupled.

One small declarative description per family; every other module asks this one where
q/k/v/o/gate/up/down are, so no driver is copied per architecture. Besides the names, an adapter
says which linears share a structured group (ALGORITHMS.md, "Structured removal in a decoder
layer"): the rows of ``gate``/``up`` (``fc1`` in OPT) and the columns of ``down`` (``fc2``) are
the MLP channels; the rows of ``q`` and columns of ``o`` are the query heads; the rows of ``k``
and ``v`` are the key/value groups. Model types prefixed ``surgeon_`` are our per-layer-shape
variants of each family (``base/modeling.py``, which owns that prefix, :class:`~base.modeling.LayerShape`
and the reader of per-layer sizes, being shipped standalone with checkpoints); their layout is the
family's own.

All knowledge of a family lives here: besides the layout, its quirks (Gemma's RMSNorm ``x * (1 + w)``,
Gemma 3's RoPE key for transformers 4.x) and, for each stock model type (:class:`ModelType`), its
per-layer-shape classes and how llama.cpp runs it (:class:`GgufArch`, applied by ``export/gguf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from base import modeling
from base.errors import SurgeonError
from base.modeling import MODEL_TYPE_PREFIX, LayerShape, config_layer_shapes, stock_model_type

# GGUF tensor kinds (gguf.MODEL_TENSOR names) of one decoder layer: the attention and MLP of every family.
_LAYER_CORE = ("ATTN_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN")
_BIASES = tuple(f"{k}.bias" for k in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN"))


def _weights(*kinds: str) -> tuple[str, ...]:
    return tuple(f"{k}.weight" for k in kinds)


@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture as our GGUF writer targets it (llama.cpp ``src/models/<name>.cpp``:
    ``load_arch_hparams``, ``load_arch_tensors`` and the graph; ``llama_model_rope_type``)."""

    name: str
    layer_tensors: tuple[str, ...]  # "KIND.weight"/"KIND.bias" every layer must have
    optional_tensors: tuple[str, ...] = ()  # read when present
    per_layer: bool = False  # creates each layer with its own sizes (deci); else all with layer 0's
    permute_qk: bool = False  # NORM RoPE (interleaved pairs): Q/K rows reordered from rotate-half
    square_q: bool = False  # creates attn_q and attn_output as hidden x hidden (qwen2): no query head may go
    output_tensor: bool = True  # reads output.weight (gemma, gemma2: always token_embd, tied)
    swa_period: int = 0  # reads sliding_window and a per-layer sliding_window_pattern (0: no sliding layers);
    # its default pattern (load_swa_pattern): layer i slides unless i % period == period - 1
    swa_rope_scaled: bool = False  # sliding layers get the global RoPE scaling (gemma2) or none (gemma3)
    softcaps: tuple[str, ...] = ()  # config soft-capping keys it reads
    softcaps_always: bool = False  # it caps even without the keys (gemma2: 50 and 30)
    q_scale_into: str | None = None  # kind that carries query_pre_attn_scalar folded in (llama.cpp scales
    # q by 1/sqrt(head_dim)); None: the architecture cannot express another scale
    wide_scale_layers: int = 0  # llama.cpp's "27B" rule: with this many layers q is scaled by
    # 1/sqrt(hidden // heads) instead
    rope_freqs: bool = False  # reads rope_freqs.weight (Llama 3 RoPE frequency factors)
    # transformers' GGUF reader rebuilds our files of it exactly (gemma2/gemma3: it takes query_pre_attn_scalar
    # as 256, not the scale we fold into q, and measured logits differ by 2.5; gemma: it has no reader)
    reads_back: bool = True


LLAMA_CPP_LLAMA = GgufArch("llama", _weights(*_LAYER_CORE, "FFN_NORM"), _BIASES, permute_qk=True, rope_freqs=True)
LLAMA_CPP_DECI = GgufArch("deci", _weights(*_LAYER_CORE, "FFN_NORM"), _BIASES, per_layer=True, permute_qk=True,
                          rope_freqs=True)
LLAMA_CPP_QWEN2 = GgufArch("qwen2", _weights(*_LAYER_CORE, "FFN_NORM") + _BIASES[:3], square_q=True)
LLAMA_CPP_QWEN3 = GgufArch("qwen3", _weights(*_LAYER_CORE, "FFN_NORM", "ATTN_Q_NORM", "ATTN_K_NORM"))
_GEMMA2_LAYER = _weights(*_LAYER_CORE, "ATTN_POST_NORM", "FFN_PRE_NORM", "FFN_POST_NORM")
LLAMA_CPP_GEMMA = GgufArch("gemma", _weights(*_LAYER_CORE, "FFN_NORM"), output_tensor=False, reads_back=False)
LLAMA_CPP_GEMMA2 = GgufArch(
    "gemma2", _GEMMA2_LAYER, output_tensor=False, swa_period=2, swa_rope_scaled=True,
    softcaps=("attn_logit_softcapping", "final_logit_softcapping"), softcaps_always=True,
    q_scale_into="ATTN_Q", wide_scale_layers=46, reads_back=False,
)
LLAMA_CPP_GEMMA3 = GgufArch(
    "gemma3", _GEMMA2_LAYER + _weights("ATTN_Q_NORM", "ATTN_K_NORM"), swa_period=6,
    softcaps=("final_logit_softcapping",), q_scale_into="ATTN_Q_NORM", wide_scale_layers=62, reads_back=False,
)


@dataclass(frozen=True)
class ModelType:
    """One stock ``model_type`` of a family: its per-layer-shape classes and how llama.cpp runs it."""

    name: str
    per_layer: Any  # base/modeling.py's causal LM for layers of different sizes (its config: ``config_class``)
    gguf: GgufArch | None = None  # the llama.cpp architecture of uniform layers (None: llama.cpp lacks it)
    rope_local_base_key: str | None = None  # transformers 4.x's top-level key for the sliding layers' RoPE base


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class Adapter:
    """Module layout of a decoder-only family (names relative to the model root, or to one layer)."""

    family: str
    types: tuple[ModelType, ...]  # stock model types; their ``surgeon_`` variants are accepted too
    layers: str = "model.layers"
    final: tuple[str, ...] = ("model.norm",)  # what runs between the last decoder layer and the LM head, in order
    attn: str = "self_attn"
    mlp: str = "mlp"  # "" when the MLP linears sit on the decoder layer itself (OPT)
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str | None = "gate_proj"  # None for a plain two-linear MLP (OPT: fc1 -> act -> fc2)
    up: str = "up_proj"
    down: str = "down_proj"
    intermediate_key: str = "intermediate_size"  # config field holding the MLP width
    grouped_kv: bool = True  # config has num_key_value_heads; False: one KV head per query head
    head_dim_derived: bool = False  # stock code computes head_dim = hidden_size // num_attention_heads
    kv_groups_attr: str | None = "num_key_value_groups"  # attention attribute: query heads per KV head
    heads_attr: str | None = None  # attention attribute: number of query heads, where the code keeps one
    mlp_width_attr: str | None = "intermediate_size"  # MLP-module attribute holding its width
    # optimum's dummy past key/value generator for the stock config (what optimum-onnx registers:
    # Llama, Mistral, Qwen2 and Qwen3 the Mistral one, Gemma its own, OPT the default one).
    optimum_past_generator: str = "MistralDummyPastKeyValuesGenerator"
    norm_offset: float = 0.0  # Hugging Face's RMSNorm computes x * (norm_offset + w) (Gemma: 1; llama.cpp: x * w)
    # llama.cpp's architecture for layers of different sizes (None: llama.cpp cannot run them in this family).
    gguf_per_layer: GgufArch | None = None

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Names of the prunable linears inside one decoder layer, in execution order."""
        return self.head_rows + self.kv_rows + self.head_cols + self.channel_rows + self.channel_cols

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears of one layer that read the same input tensor (one input statistic serves each group)."""
        return (self.head_rows + self.kv_rows, self.head_cols, self.channel_rows, self.channel_cols)

    @property
    def head_rows(self) -> tuple[str, ...]:
        """Linears whose output rows come in query heads of ``head_dim`` rows (q)."""
        return (_join(self.attn, self.q),)

    @property
    def kv_rows(self) -> tuple[str, ...]:
        """Linears whose output rows come in key/value heads of ``head_dim`` rows (k, v)."""
        return (_join(self.attn, self.k), _join(self.attn, self.v))

    @property
    def head_cols(self) -> tuple[str, ...]:
        """Linears whose input columns come in query heads of ``head_dim`` columns (o)."""
        return (_join(self.attn, self.o),)

    @property
    def channel_rows(self) -> tuple[str, ...]:
        """Linears whose output rows are the MLP channels (gate and up; OPT's fc1)."""
        names = (self.gate, self.up) if self.gate is not None else (self.up,)
        return tuple(_join(self.mlp, n) for n in names)

    @property
    def channel_cols(self) -> tuple[str, ...]:
        """Linears whose input columns are the MLP channels (down; OPT's fc2)."""
        return (_join(self.mlp, self.down),)

    @property
    def model_types(self) -> tuple[str, ...]:
        """Stock model types of the family."""
        return tuple(t.name for t in self.types)

    @property
    def all_model_types(self) -> tuple[str, ...]:
        """Stock model types and their per-layer-shape ``surgeon_`` variants."""
        return self.model_types + tuple(MODEL_TYPE_PREFIX + t for t in self.model_types)

    def model_type(self, model_type: str) -> ModelType:
        """What the family knows of a stock or ``surgeon_`` model type."""
        stock = stock_model_type(model_type)
        for t in self.types:
            if t.name == stock:
                return t
        raise SurgeonError(f"model type {model_type!r} is not of the {self.family} family")

    def gguf_arch(self, model_type: str) -> GgufArch | None:
        """The llama.cpp architecture of a stock or ``surgeon_`` model type (None: llama.cpp lacks it)."""
        return self.model_type(model_type).gguf

    def config_shapes(self, config: object) -> list[LayerShape]:
        """Every decoder layer's sizes as a config (object or ``config.json`` dict) gives them: the per-layer
        lists of a ``surgeon_*`` config, else the global sizes (:func:`base.modeling.config_layer_shapes`)."""
        try:
            return config_layer_shapes(config, self.intermediate_key, self.grouped_kv)
        except ValueError as exc:
            raise SurgeonError(str(exc)) from None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return model.get_submodule(self.layers)  # type: ignore[return-value]

    def decoder_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear of the decoder, keyed by its full module name."""
        out: dict[str, nn.Linear] = {}
        for i, layer in enumerate(self.decoder_layers(model)):
            for name in self.linear_names:
                out[f"{self.layers}.{i}.{name}"] = self.linear(layer, name)
        return out

    @staticmethod
    def linear(layer: nn.Module, name: str) -> nn.Linear:
        """The linear ``name`` of one decoder layer (checked to be an ``nn.Linear``)."""
        module = layer.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not nn.Linear")
        return module

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer."""
        return layer.get_submodule(self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The module holding the MLP linears of one decoder layer (the layer itself for OPT)."""
        return layer.get_submodule(self.mlp) if self.mlp else layer

    def head_layout(self, config: object) -> tuple[int, int, int]:
        """``(query heads, KV heads, head_dim)`` of a config (one KV head per query head without GQA)."""
        c: Any = config
        n_heads = int(c.num_attention_heads)
        n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads) if self.grouped_kv else n_heads
        return n_heads, n_kv, self.head_dim(config)

    def per_layer_classes(self, model_type: str) -> tuple[Any, Any]:
        """The per-layer-shape ``(config class, causal LM class)`` of a stock or ``surgeon_`` model type."""
        model_cls = self.model_type(model_type).per_layer
        return model_cls.config_class, model_cls

    def head_dim(self, config: object) -> int:
        """Size of one attention head: the config's explicit ``head_dim``, else hidden / heads."""
        explicit = getattr(config, "head_dim", None)
        if explicit:
            return int(explicit)
        return int(config.hidden_size) // int(config.num_attention_heads)  # type: ignore[attr-defined]


LLAMA = Adapter(
    family="llama",
    types=(
        ModelType("llama", modeling.SurgeonLlamaForCausalLM, LLAMA_CPP_LLAMA),
        ModelType("mistral", modeling.SurgeonMistralForCausalLM, LLAMA_CPP_LLAMA),
        ModelType("qwen2", modeling.SurgeonQwen2ForCausalLM, LLAMA_CPP_QWEN2),
        ModelType("qwen3", modeling.SurgeonQwen3ForCausalLM, LLAMA_CPP_QWEN3),
    ),
    gguf_per_layer=LLAMA_CPP_DECI,
)
# Gemma's extra norms (pre/post feed-forward, and Gemma3's q_norm/k_norm within head_dim) act on the
# hidden size or within a head, neither of which structured removal ever cuts.
GEMMA = Adapter(
    family="gemma",
    types=(
        ModelType("gemma", modeling.SurgeonGemmaForCausalLM, LLAMA_CPP_GEMMA),
        ModelType("gemma2", modeling.SurgeonGemma2ForCausalLM, LLAMA_CPP_GEMMA2),
        ModelType("gemma3_text", modeling.SurgeonGemma3ForCausalLM, LLAMA_CPP_GEMMA3,
                  rope_local_base_key="rope_local_base_freq"),
    ),
    optimum_past_generator="GemmaDummyPastKeyValuesGenerator",
    norm_offset=1.0,
)
OPT = Adapter(
    family="opt",
    types=(ModelType("opt", modeling.SurgeonOPTForCausalLM),),
    layers="model.decoder.layers",
    final=("model.decoder.final_layer_norm", "model.decoder.project_out"),  # either may be None (OPT-350m)
    mlp="",
    o="out_proj",
    gate=None,
    up="fc1",
    down="fc2",
    intermediate_key="ffn_dim",
    grouped_kv=False,
    head_dim_derived=True,
    kv_groups_attr=None,
    heads_attr="num_heads",
    mlp_width_attr=None,
    optimum_past_generator="DummyPastKeyValuesGenerator",
)
ADAPTERS: tuple[Adapter, ...] = (LLAMA, GEMMA, OPT)


def supported_model_types() -> list[str]:
    """Stock model types we support, family by family (each also has a ``surgeon_`` variant)."""
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model_type: str) -> Adapter:
    """The adapter for a config's ``model_type``; a clear error for anything else."""
    for adapter in ADAPTERS:
        if model_type in adapter.all_model_types:
            return adapter
    raise SurgeonError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())} "
        f"(and their {MODEL_TYPE_PREFIX}* per-layer-shape variants)"
    )


def find_model_type(model_type: str) -> ModelType | None:
    """What the adapters know of a stock or ``surgeon_`` model type (None: not a supported one)."""
    stock = stock_model_type(model_type)
    return next((t for a in ADAPTERS for t in a.types if t.name == stock), None)


def gguf_architectures() -> dict[str, GgufArch]:
    """Every llama.cpp architecture our GGUF writer targets, by name."""
    archs = [t.gguf for a in ADAPTERS for t in a.types] + [a.gguf_per_layer for a in ADAPTERS]
    return {arch.name: arch for arch in archs if arch is not None}
