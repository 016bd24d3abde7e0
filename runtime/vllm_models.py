"""Our per-layer-shape checkpoints as vLLM models, built from vLLM's own Llama layers.

A ``surgeon_llama`` or ``surgeon_mistral`` checkpoint (``base/modeling.py``) gives every decoder
layer its own MLP width and its own numbers of query and key/value heads; hidden size, ``head_dim``
and vocabulary are shared. vLLM's ``LlamaDecoderLayer`` (``vllm/model_executor/models/llama.py``)
reads all of its sizes from the config it is handed, and ``LlamaModel`` builds every layer through
a ``layer_type`` factory called with the layer's prefix (``model.layers.{i}``). So the per-layer
model is vLLM's ``LlamaForCausalLM`` (or ``MistralForCausalLM``) with a layer type that hands layer
``i`` a shallow copy of the config holding layer ``i``'s sizes (:func:`base.modeling.layer_config`,
the same copy our transformers classes build their layers from). No forward pass, weight loader or
attention is written here: QKV and gate/up fusion, the paged KV cache (one cache shape per layer)
and the weight names are vLLM's own.

Qwen2 and Qwen3 build their layers inside ``Qwen2Model``, which their causal-LM classes name
directly (no layer type to hand in), and vLLM's Qwen2 attention takes ``head_dim`` as hidden size over
query heads (wrong once heads are removed). Both are served on vLLM's ``LlamaModel`` instead: Qwen2's
decoder is Llama's with biases on q, k and v and none on o, which vLLM's Llama layer builds from
``qkv_bias`` (its InternLM3 switch); Qwen3's is vLLM's own ``Qwen3DecoderLayer`` (per-head q/k norms,
``head_dim`` from the config), which ``LlamaModel`` calls as it calls its own layers. Both keep their
family's RoPE default (theta 1e6 when the config names none).

Gemma, Gemma2 and Gemma3 build their layers inside their ``...Model`` with a ``lambda`` naming the
decoder-layer class of their module (``GemmaDecoderLayer(config, cache_config, quant_config,
prefix=...)``), and their layers read every size from that config (``head_dim`` included, the
sliding window from ``config.layer_types[i]``). Their per-layer models are vLLM's own causal-LM classes
built while that module name is bound to a subclass handing layer ``i`` its sized config
(:func:`_built_with`); the name is restored when the constructor returns, so a stock Gemma in the same
process is untouched. The embedding scale, the four norms, soft-capping, the two RoPE bases and the
weight loader stay vLLM's. OPT is built the same way, with vLLM's ``OPTAttention`` bound to
:class:`SurgeonOPTAttention` as well (vLLM's derives ``head_dim`` from hidden size over heads, wrong once
heads are removed).
These classes are registered by :func:`runtime.vllm_plugin.register` (the ``vllm.general_plugins``
entry point) under the ``architectures`` names our checkpoints carry.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models import gemma, gemma2, gemma3, opt
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import extract_layer_index
from vllm.transformers_utils.config import set_default_rope_theta

from base.modeling import layer_config


def _sized(vllm_config: VllmConfig, prefix: str, config: Any) -> Any:
    """The config of the layer at ``prefix`` (``...layers.{i}``): the model's, holding layer i's sizes."""
    return layer_config(config or vllm_config.model_config.hf_config, extract_layer_index(prefix))


class SurgeonLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer, built with its own layer's sizes."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None, **kwargs: Any) -> None:
        super().__init__(vllm_config, prefix, config=_sized(vllm_config, prefix, config), **kwargs)


class SurgeonMistralDecoderLayer(MistralDecoderLayer):
    """vLLM's Mistral decoder layer, built with its own layer's sizes."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        super().__init__(vllm_config, prefix, config=_sized(vllm_config, prefix, config))


class SurgeonQwen2DecoderLayer(LlamaDecoderLayer):
    """A Qwen2 decoder layer with its own sizes: vLLM's Llama layer with biases on q, k and v only."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        sized = _sized(vllm_config, prefix, config)
        sized.attention_bias, sized.qkv_bias = False, True  # o_proj has no bias in Qwen2
        set_default_rope_theta(sized, default_theta=1000000)  # as vLLM's Qwen2 layer does
        super().__init__(vllm_config, prefix, config=sized)


class SurgeonQwen3DecoderLayer(Qwen3DecoderLayer):
    """vLLM's Qwen3 decoder layer with its own sizes, called as ``LlamaModel`` calls its layers."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        super().__init__(_sized(vllm_config, prefix, config), cache_config=vllm_config.cache_config,
                         quant_config=vllm_config.quant_config, prefix=prefix)


def _per_layer(name: str, model: type, layer_type: type, doc: str) -> type:
    """The vLLM causal LM ``model`` (one that takes a ``layer_type``) building its layers with ``layer_type``."""

    def __init__(self: Any, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        model.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    return type(name, (model,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


SurgeonLlamaForCausalLM = _per_layer("SurgeonLlamaForCausalLM", LlamaForCausalLM, SurgeonLlamaDecoderLayer,
                                     "A ``surgeon_llama`` checkpoint: vLLM's Llama with per-layer sizes.")
SurgeonMistralForCausalLM = _per_layer("SurgeonMistralForCausalLM", MistralForCausalLM, SurgeonMistralDecoderLayer,
                                       "A ``surgeon_mistral`` checkpoint: vLLM's Mistral with per-layer sizes.")
SurgeonQwen2ForCausalLM = _per_layer("SurgeonQwen2ForCausalLM", LlamaForCausalLM, SurgeonQwen2DecoderLayer,
                                     "A ``surgeon_qwen2`` checkpoint: vLLM's Llama model with Qwen2 layers of "
                                     "per-layer sizes.")
SurgeonQwen3ForCausalLM = _per_layer("SurgeonQwen3ForCausalLM", LlamaForCausalLM, SurgeonQwen3DecoderLayer,
                                     "A ``surgeon_qwen3`` checkpoint: vLLM's Llama model with vLLM's Qwen3 layers "
                                     "of per-layer sizes.")


def _sized_layer(stock: type) -> type:
    """A subclass of a Gemma-style decoder layer class ``stock(config, cache_config, quant_config, prefix)``
    built with its own layer's sizes."""

    def __init__(self: Any, config: Any, cache_config: Any = None, quant_config: Any = None, prefix: str = "") -> None:
        stock.__init__(self, layer_config(config, extract_layer_index(prefix)), cache_config, quant_config,
                       prefix=prefix)

    return type(f"Surgeon{stock.__name__}", (stock,), {"__init__": __init__, "__module__": __name__})


class SurgeonOPTAttention(opt.OPTAttention):
    """vLLM's OPT attention with its layer's number of heads and the checkpoint's ``head_dim`` (stock vLLM
    takes hidden size over heads, wrong once heads are removed): built as vLLM builds it for
    ``heads * head_dim`` wide attention (its ``Attention``, scaling and forward), with q/k/v taking the
    hidden size in and the output projection giving it back."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, cache_config: Any = None,
                 quant_config: Any = None, prefix: str = "") -> None:
        config = get_current_vllm_config().model_config.hf_config
        heads, head_dim = config.layer_num_attention_heads[extract_layer_index(prefix)], config.head_dim
        super().__init__(heads * head_dim, heads, bias, cache_config, quant_config, prefix)
        self.embed_dim = embed_dim
        self.qkv_proj = QKVParallelLinear(embed_dim, head_dim, heads, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.out_proj = RowParallelLinear(heads * head_dim, embed_dim, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.out_proj")


def _built_with(name: str, model: type, module: ModuleType, layer_name: str, doc: str,
                also: dict[str, type] | None = None) -> type:
    """vLLM's causal LM ``model``, whose module builds its layers through the global ``module.<layer_name>``,
    constructed while that name is bound to the sized subclass, and the names in ``also`` to theirs
    (restored afterwards, also on errors)."""
    bound = {layer_name: _sized_layer(getattr(module, layer_name)), **(also or {})}

    def __init__(self: Any, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        stock = {k: getattr(module, k) for k in bound}
        for k, v in bound.items():
            setattr(module, k, v)
        try:
            model.__init__(self, vllm_config=vllm_config, prefix=prefix)
        finally:
            for k, v in stock.items():
                setattr(module, k, v)

    return type(name, (model,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


SurgeonGemmaForCausalLM = _built_with("SurgeonGemmaForCausalLM", gemma.GemmaForCausalLM, gemma, "GemmaDecoderLayer",
                                      "A ``surgeon_gemma`` checkpoint: vLLM's Gemma with per-layer sizes.")
SurgeonGemma2ForCausalLM = _built_with("SurgeonGemma2ForCausalLM", gemma2.Gemma2ForCausalLM, gemma2,
                                       "Gemma2DecoderLayer",
                                       "A ``surgeon_gemma2`` checkpoint: vLLM's Gemma2 with per-layer sizes.")
SurgeonGemma3ForCausalLM = _built_with("SurgeonGemma3ForCausalLM", gemma3.Gemma3ForCausalLM, gemma3,
                                       "Gemma3DecoderLayer",
                                       "A ``surgeon_gemma3_text`` checkpoint: vLLM's Gemma3 (text) with per-layer "
                                       "sizes.")
SurgeonOPTForCausalLM = _built_with("SurgeonOPTForCausalLM", opt.OPTForCausalLM, opt, "OPTDecoderLayer",
                                    "A ``surgeon_opt`` checkpoint: vLLM's OPT with per-layer MLP widths and heads.",
                                    also={"OPTAttention": SurgeonOPTAttention})
