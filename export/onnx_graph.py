"""The decoder graph that ``export/onnx.py`` traces: names, dynamic axes, dummy inputs, attention, a wrapper.

The graph follows the convention of the ONNX Runtime / Hugging Face optimum ecosystem for a causal
LM with KV cache (optimum's ``TextDecoderWithPositionIdsOnnxConfig``), so tools written for
optimum exports can read ours:

- inputs ``input_ids`` and ``position_ids`` ``[batch_size, sequence_length]`` (int64),
  ``attention_mask`` ``[batch_size, past_sequence_length + sequence_length]`` (int64, 1 = attend),
  ``past_key_values.{i}.key/value`` ``[batch_size, kv_heads_i, past_sequence_length, head_dim]``;
- outputs ``logits`` ``[batch_size, logits_length, vocab_size]`` and ``present.{i}.key/value``
  ``[batch_size, kv_heads_i, past_sequence_length + sequence_length, head_dim]``;
- one optional input, ``num_logits_to_keep`` (int64 scalar, default 0: every position, so
  ``logits_length`` is ``sequence_length`` as in optimum's graphs): logits of the last ``k``
  positions only, as transformers' ``logits_to_keep`` (a prefill then skips the LM head on all
  but the last position). It is a graph input with a default initializer, so callers that do not
  know it need not feed it.

The first step passes past tensors with ``past_sequence_length`` 0 (optimum's single-graph
decoders do the same). ``kv_heads_i`` may differ between layers: a structurally pruned model keeps
its own number of key/value heads in every layer.

Where optimum can serve, it does: for stock checkpoints the past key/value dummies come from the
generator optimum-onnx registers for the family, over optimum's normalized config. It cannot serve
per-layer-shape (``surgeon_*``) checkpoints: its generators build every layer with the config's one
``num_key_value_heads``, and such a config's global count is the unpruned one, so the dummies (and
the traced graph's static head counts) would be wrong. Those use the layers' own shapes, read from
the linears (``tests/test_onnx_export.py`` checks both paths and their difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from base.adapters import Adapter, get_adapter
from base.modeling import MODEL_TYPE_PREFIX, stock_model_type
from base.surgery import layer_shapes

INPUTS = ("input_ids", "attention_mask", "position_ids")
KEEP = "num_logits_to_keep"  # optional (a default initializer of 0): logits of the last k positions only
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
LOGITS = "logits_length"  # sequence_length, or num_logits_to_keep when that is positive


@dataclass(frozen=True)
class GraphSpec:
    """Shapes of a decoder graph: one entry of ``kv_heads`` per layer."""

    kv_heads: tuple[int, ...]
    head_dim: int
    vocab_size: int
    # Uniform cache interface: every layer's past and present carry this many KV heads at the graph
    # boundary (the layer's own heads first, zeros after); None: each layer's own count.
    cache_heads: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    @property
    def past_names(self) -> list[str]:
        """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return [*INPUTS, *self.past_names, KEEP]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """optimum's axis names for every input and output."""
        axes = {"input_ids": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: TOTAL},
                "position_ids": {0: BATCH, 1: SEQ}, "logits": {0: BATCH, 1: LOGITS}}
        axes.update({name: {0: BATCH, 2: PAST} for name in self.past_names})
        axes.update({name: {0: BATCH, 2: TOTAL} for name in self.present_names})
        return axes

    def past_shape(self, layer: int, batch: int, past: int) -> tuple[int, int, int, int]:
        heads = self.cache_heads or self.kv_heads[layer]
        return (batch, heads, past, self.head_dim)  # [B, kv_heads_i (or cache_heads), P, head_dim]

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "kv_heads": list(self.kv_heads), "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "cache_kv_heads": self.cache_heads}


def graph_spec(model: nn.Module, adapter: Adapter, uniform_cache: bool = False) -> GraphSpec:
    """The graph shapes of ``model``: per-layer KV heads read from its linears.

    ``uniform_cache`` (per-layer-shape models only; a stock model's cache is uniform already) pads
    every layer's cache to one KV-head count at the graph boundary, the count that tools sizing the
    cache from the config (optimum's ``ORTModelForCausalLM``) use: the largest layer's for grouped
    KV families, whose written config then says so, and the config's query-head count for the
    others (OPT), which such tools read instead (see :func:`uniform_config`).
    """
    config: Any = model.config
    kv = tuple(s.num_key_value_heads for s in layer_shapes(model, adapter))
    cache = None
    if uniform_cache and is_per_layer(config):
        cache = max(kv) if adapter.grouped_kv else int(config.num_attention_heads)
    return GraphSpec(kv_heads=kv, head_dim=adapter.head_dim(config), vocab_size=int(config.vocab_size), cache_heads=cache)


def uniform_config(config: Any, spec: GraphSpec) -> dict[str, Any]:
    """The config written beside a uniform-cache graph: the stock family's, global counts matching the cache.

    ``model_type`` is the stock one (tools know it; ``surgeon_*`` would need code from the directory),
    ``num_key_value_heads`` is the cache's head count, and the per-layer fields stay, so FLOPs and
    shapes remain readable. It describes the graph's interface; no weights are loaded from it.
    """
    out = config.to_dict()
    out["model_type"] = stock_model_type(str(config.model_type))
    out["architectures"] = [a.removeprefix("Surgeon") for a in out.get("architectures") or []]
    out.pop("auto_map", None)
    # transformers' per_layer_config would make the stock config heterogeneous, and stock code (optimum,
    # AutoConfig readers) then refuses the global head counts this interface is for; our layer_* keys stay
    out.pop("per_layer_config", None)
    if "num_key_value_heads" in out:
        out["num_key_value_heads"] = spec.cache_heads
    return out


def is_per_layer(config: Any) -> bool:
    """Whether ``config`` is one of our per-layer-shape (``surgeon_*``) configs."""
    return str(config.model_type).startswith(MODEL_TYPE_PREFIX)


def optimum_past_generator(config: Any, batch: int, past: int) -> Any:
    """optimum's past key/value dummy generator for a stock config, the one its family's adapter names."""
    import optimum.utils

    generator = getattr(optimum.utils, get_adapter(str(config.model_type)).optimum_past_generator)
    return generator("text-generation", optimum.utils.NormalizedTextConfig(config), batch_size=batch, sequence_length=past)


def dummy_inputs(model: nn.Module, spec: GraphSpec, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Tensor, ...]:
    """Inputs to trace with: ``seq`` new tokens after ``past`` cached ones, so every axis is dynamic.

    Past tensors come from optimum's generator for stock configs and from ``spec`` (the layers' own
    shapes) for per-layer-shape configs (see the module docstring).
    """
    config: Any = model.config
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, spec.vocab_size, (batch, seq))  # [B, T]
    mask = torch.ones(batch, past + seq, dtype=torch.long)  # [B, P + T]
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()  # [B, T]
    if is_per_layer(config):
        kv = [torch.randn(spec.past_shape(i // 2, batch, past), dtype=dtype) for i in range(2 * spec.num_layers)]
    else:
        float_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        pairs = optimum_past_generator(config, batch, past).generate("past_key_values", framework="pt",
                                                                     float_dtype=float_dtype)
        kv = [t for pair in pairs for t in pair]
    return (ids, mask, positions, *kv, torch.tensor(0))


ATTENTION = "surgeon_onnx"  # the attention implementation traced into the graph


def grouped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """Hugging Face's eager attention, with each KV head broadcast over its query group, not copied.

    ``repeat_kv`` would write every key and value ``n_heads / n_kv_heads`` times per step (an
    ``Expand`` over the whole cache); grouping the query heads as ``[B, kv, group, T, D]`` lets
    ``MatMul`` broadcast instead. Same products and sums as eager (float32 softmax, Gemma 2's
    soft-capping, additive mask), in the same order.
    """
    batch, heads, length, dim = query.shape
    kv = key.shape[1]
    q = query.reshape(batch, kv, heads // kv, length, dim)  # [B, kv, g, T, D]
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2))  # [B, kv, g, T, S]
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask.unsqueeze(2)  # mask [B, 1, T, S] -> [B, 1, 1, T, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value.unsqueeze(2))  # [B, kv, g, T, D]
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None  # [B, T, H, D]


def register_attention() -> str:
    """Make :func:`grouped_attention` (with eager's additive mask) selectable by name; returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return ATTENTION


class _TiedHead(torch.autograd.Function):
    """``h @ W.T (+ b)``, exported as one ``Gemm(transB=1)`` that reads ``W`` as stored.

    The TorchScript exporter writes ``nn.Linear`` on a 3-D input as ``MatMul`` with a pre-transposed
    copy of the weight; for a tied LM head that copy would store the embedding matrix twice.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG004
        return F.linear(h, weight, bias)

    @staticmethod
    def symbolic(g: Any, h: Any, weight: Any, bias: Any) -> Any:
        if bias is None or bias.node().mustBeNone():
            return g.op("Gemm", h, weight, transB_i=1)
        return g.op("Gemm", h, weight, bias, transB_i=1)


class DecoderWithPast(nn.Module):
    """A Hugging Face causal LM as a function of flat tensors: the graph's inputs to its outputs.

    The past tensors become a ``transformers.DynamicCache`` with one full-attention layer per
    decoder layer (sliding-window layers of Gemma 2/3 then keep the whole past; the sliding window
    is applied by the attention mask, so the logits equal the model's own). The decoder runs
    unchanged; the LM head (with Gemma's final logit soft-capping) is applied here so that a tied
    head shares the embedding's initializer.
    """

    def __init__(self, model: nn.Module, spec: GraphSpec) -> None:
        super().__init__()
        # Attribute names as in the causal LM, so graph initializers keep the checkpoint's names.
        self.model = model.get_submodule("model")  # the base model of every supported family
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"LM head is a {type(head).__name__}, not nn.Linear")
        self.lm_head = head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.spec = spec

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        """``rest`` is the flat past (key, value per layer), then ``num_logits_to_keep`` (a 0-d tensor)."""
        from transformers import DynamicCache

        *past, keep = rest
        cache = DynamicCache()
        for i, heads in enumerate(self.spec.kv_heads):
            key, value = past[2 * i], past[2 * i + 1]  # [B, kv_heads_i (or cache_heads), P, head_dim]
            if self.spec.cache_heads and heads < self.spec.cache_heads:  # uniform cache: the padding never
                key, value = key[:, :heads], value[:, :heads]            # reaches attention, so it cannot matter
            cache.update(key, value, i)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True).last_hidden_state  # [B, T, H]
        hidden = hidden[:, -keep:]  # [B, K, H]; keep = 0 slices from 0, i.e. every position
        batch, seq, width = hidden.shape
        logits = _TiedHead.apply(hidden.reshape(-1, width), self.lm_head.weight, self.lm_head.bias)  # [B*T, V]
        logits = logits.reshape(batch, seq, self.spec.vocab_size)  # [B, T, V]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # [B, kv_i, P + T, hd]
        if self.spec.cache_heads:  # zeros after each layer's own heads, up to the uniform count
            presents = [F.pad(t, (0, 0, 0, 0, 0, self.spec.cache_heads - t.shape[1])) if t.shape[1] < self.spec.cache_heads
                        else t for t in presents]
        return (logits, *presents)
