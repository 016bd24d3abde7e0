"""The config of a checkpoint in the Nemotron-NAS layout, for vLLM and SGLang with nothing of ours installed.

NVIDIA's Nemotron-NAS models (Puzzle/Puzzletron; architecture ``DeciLMForCausalLM``, model type
``nemotron-nas``) are Llama decoders whose layers differ: ``block_configs[i]`` gives layer ``i``'s
attention (``no_op``, or ``n_heads_in_group``: query heads per KV head, every layer having the model's
``num_attention_heads`` query heads) and its MLP (``no_op``, or its width as ``intermediate_size`` or
as ``ffn_mult``). vLLM (``model_executor/models/nemotron_nas.py``) and SGLang
(``srt/models/nemotron_nas.py``) build such models from their own Llama layers and read these
fields by attribute (``config.block_configs[i].attention.no_op``); transformers has no config class
for the type, so a checkpoint ships one and is loaded with ``trust_remote_code=True``.

This is our own such class (not NVIDIA's ``configuration_decilm.py``): surgeon-export copies this
file beside a checkpoint written with ``--layout nemotron-nas`` (:mod:`export.nemotron_nas`) as
``configuration_nemotron_nas.py``, with an ``auto_map`` entry for ``AutoConfig``. Everything else in
the config is Llama's (RoPE, norms, ``head_dim``, which is explicit: the query heads need not divide
the hidden size). It imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"


class Section:
    """One part of a block config (its ``attention`` or its ``ffn``), read by attribute.

    Only the fields given exist as attributes: vLLM takes an MLP's width from ``ffn_mult`` when the
    attribute exists (``hasattr``) and from ``intermediate_size`` otherwise.
    """

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("no_op", False)
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"Section({self.__dict__})"


class BlockConfig:
    """One decoder layer: ``attention`` and ``ffn`` sections."""

    def __init__(self, attention: dict[str, Any] | Section, ffn: dict[str, Any] | Section) -> None:
        self.attention = attention if isinstance(attention, Section) else Section(**attention)
        self.ffn = ffn if isinstance(ffn, Section) else Section(**ffn)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


class NemotronNasConfig(LlamaConfig):
    """A Llama config with one :class:`BlockConfig` per decoder layer (``block_configs``)."""

    model_type = MODEL_TYPE

    def __init__(self, block_configs: list[Any] | None = None, **kwargs: Any) -> None:
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs or []]
        heads, hidden = kwargs.get("num_attention_heads"), kwargs.get("hidden_size")
        if heads and hidden and hidden % heads and kwargs.get("head_dim"):
            # transformers 5's LlamaConfig refuses query heads that do not divide the hidden size (the
            # head_dim it would derive); head_dim is explicit here, so it is built with one head and
            # given its real count after (nothing else it derives depends on the heads).
            super().__init__(**{**kwargs, "num_attention_heads": 1})
            self.num_attention_heads = heads
        else:
            super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
