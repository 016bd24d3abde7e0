"""A shrunk Llama or Mistral in the Nemotron-NAS layout, which stock vLLM and SGLang serve (``--layout nemotron-nas``).

NVIDIA's Nemotron-NAS models (``DeciLMForCausalLM``, model type ``nemotron-nas``) describe each
decoder layer by a block config (``base/nemotron_nas.py``): attention ``n_heads_in_group`` (query
heads per KV head) or ``no_op``, MLP width or ``no_op``; the number of query heads is the model's,
the same in every layer. vLLM (``vllm/model_executor/models/nemotron_nas.py``) serves it with no
plugin, from a ``config.json`` whose ``auto_map`` names the config class shipped beside the weights
(``trust_remote_code=True``). Which of our shapes fit, as :func:`nas_layout` checks them:

- every layer that has attention has the same number of query heads (all of them kept, or the same
  number removed everywhere); its KV heads are its own (``n_heads_in_group`` = heads / KV heads);
- MLP widths are free: ``ffn_mult`` where DeciLM's formula gives the width exactly (a multiple of
  256, :func:`ffn_entry`), else ``intermediate_size``;
- a layer whose attention or MLP adds nothing (:func:`export.compress.silent_blocks`; e.g. a masked
  model's fully zeroed MLP, which ``shrink`` keeps as one zero channel) gets a ``no_op`` block, and
  its tensors (the block and the norm before it) are not written; the first layer that computes
  anything must have attention (vLLM's and SGLang's code add the residual stream there);
- Llama and Mistral only (Mistral without a sliding window): DeciLM is a Llama decoder.

Anything else is refused in one line that names the first layer that does not fit. The per-layer
format (the default layout) takes every shape, served by our vLLM plugin (docs/vllm.md).

SGLang (read in ``sgl-project/sglang``'s ``srt/models/nemotron_nas.py`` and
``srt/configs/model_config.py``, not run here) reads an MLP's width only from ``ffn_mult`` and
refuses KV-head counts that differ between layers ("Variable GQA (VGQA) is not yet supported");
:func:`nas_layout` says in ``sglang`` why a checkpoint does not fit it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from base.adapters import Adapter
from base.errors import SurgeonError
from base.formats import NAS_CONFIG_FILE
from base.modeling import LAYER_FIELDS, stock_model_type
from base.nemotron_nas import ARCHITECTURE, NemotronNasConfig
from base.surgery import layer_shapes
from export.compress import silent_blocks

MODEL_TYPES = ("llama", "mistral")  # the Llama decoders DeciLM's layers are
FFN_MULT_MULTIPLE = 256  # DeciLM rounds the width it derives from ffn_mult up to a multiple of this
NORM_BEFORE = {"attention": "input_layernorm", "ffn": "post_attention_layernorm"}  # Llama's names; a no_op block has none
USE_DEFAULT = "use the default layout, which our vLLM plugin serves (docs/vllm.md)"


@dataclass
class NasLayout:
    """What :func:`nas_layout` found: the config to write and the tensors no block reads."""

    config: NemotronNasConfig
    dropped: tuple[str, ...]  # name prefixes of the tensors of no_op blocks
    no_op_attention: list[int]
    no_op_ffn: list[int]
    sglang: str | None  # why SGLang cannot serve it (None: it fits what SGLang's sources read)


def ffn_mult_width(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width DeciLM derives from ``ffn_mult`` (vLLM's and SGLang's ``_ffn_mult_to_intermediate_size``)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULT_MULTIPLE) * FFN_MULT_MULTIPLE


def ffn_entry(width: int, hidden_size: int) -> dict[str, Any]:
    """The block config's MLP width: ``ffn_mult`` where DeciLM's formula gives ``width`` back exactly
    (SGLang reads nothing else), else ``intermediate_size`` (vLLM reads either).

    Example:
        >>> ffn_entry(256, 48), ffn_entry(40, 48)
        ({'ffn_mult': 8.0}, {'intermediate_size': 40})
    """
    ffn_mult = 1.5 * width / hidden_size
    if width % FFN_MULT_MULTIPLE == 0 and ffn_mult_width(ffn_mult, hidden_size) == width:
        return {"ffn_mult": ffn_mult}
    return {"intermediate_size": width}


def check_family(config: Any) -> None:
    """Refuse, in one line, a model whose family the Nemotron-NAS layout cannot describe."""
    model_type = stock_model_type(str(config.model_type))
    if model_type not in MODEL_TYPES:
        raise SurgeonError(f"--layout nemotron-nas writes Llama and Mistral models (DeciLM is a Llama decoder), not "
                           f"{model_type}: use the default layout")
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise SurgeonError(f"--layout nemotron-nas: this {model_type} attends through a sliding window of {window} "
                           f"tokens, which Nemotron-NAS has no field for: {USE_DEFAULT}")


def nas_layout(model: nn.Module, adapter: Adapter) -> NasLayout:
    """The Nemotron-NAS config of ``model``'s current shapes, or a one-line SurgeonError naming the
    first layer that does not fit (module docstring).

    Args:
        model: a shrunk (or dense) Llama or Mistral, stock or ``surgeon_*``.
        adapter: its layout.

    Example:
        >>> nas_layout(model, LLAMA).config.block_configs[0].attention.n_heads_in_group  # doctest: +SKIP
        3
    """
    config: Any = model.config
    check_family(config)
    shapes = layer_shapes(model, adapter)
    silent = silent_blocks(model, adapter)
    active = [i for i, (attn, ffn) in enumerate(silent) if not (attn and ffn)]
    if not active:
        raise SurgeonError("--layout nemotron-nas: no layer's attention or MLP computes anything")
    if silent[active[0]][0]:
        raise SurgeonError(f"--layout nemotron-nas: layer {active[0]} has an MLP but no attention, and no layer before "
                           f"it computes anything; vLLM's and SGLang's Nemotron-NAS code needs attention there: "
                           f"{USE_DEFAULT}")
    attending = [i for i, (attn, _) in enumerate(silent) if not attn]
    first = attending[0]
    heads = shapes[first].num_attention_heads
    for i in attending:
        if shapes[i].num_attention_heads != heads:
            raise SurgeonError(
                f"--layout nemotron-nas: layer {i} has {shapes[i].num_attention_heads} query heads and layer {first} "
                f"{heads}; Nemotron-NAS gives every layer the same query heads (KV heads and MLP widths may differ "
                f"per layer): {USE_DEFAULT}")
    hidden = int(config.hidden_size)
    blocks, dropped = [], []
    for i, (shape, (no_attn, no_ffn)) in enumerate(zip(shapes, silent)):
        attention = {"no_op": True} if no_attn else {"no_op": False, "n_heads_in_group": heads // shape.num_key_value_heads}
        ffn = {"no_op": True} if no_ffn else {"no_op": False, **ffn_entry(shape.intermediate_size, hidden)}
        blocks.append({"attention": attention, "ffn": ffn})
        for part, module, off in (("attention", adapter.attn, no_attn), ("ffn", adapter.mlp, no_ffn)):
            if off:
                dropped += [f"{adapter.layers}.{i}.{module}.", f"{adapter.layers}.{i}.{NORM_BEFORE[part]}."]
    d = config.to_dict()
    for key in ("model_type", *LAYER_FIELDS, "per_layer_config", "surgeon_format_version", "auto_map", "architectures",
                "transformers_version", "sliding_window", "num_key_value_heads", "head_dim", "num_attention_heads"):
        d.pop(key, None)
    nas = NemotronNasConfig(
        **d, block_configs=blocks, num_attention_heads=heads, head_dim=adapter.head_dim(config),
        num_key_value_heads=shapes[first].num_key_value_heads,  # the first attention layer's, as vLLM derives it
        architectures=[ARCHITECTURE], auto_map={"AutoConfig": f"{Path(NAS_CONFIG_FILE).stem}.{NemotronNasConfig.__name__}"},
    )
    no_attn = [i for i, (a, _) in enumerate(silent) if a]
    no_ffn = [i for i, (_, f) in enumerate(silent) if f]
    return NasLayout(nas, tuple(dropped), no_attn, no_ffn, _sglang(shapes, silent, blocks, config))


def _sglang(shapes: list, silent: list[tuple[bool, bool]], blocks: list[dict], config: Any) -> str | None:
    """Why SGLang's Nemotron-NAS code (as read in its sources) cannot serve these blocks, or None."""
    reasons = []
    kv = sorted({s.num_key_value_heads for s, (attn, _) in zip(shapes, silent) if not attn})
    if len(kv) > 1:
        reasons.append(f"its layers have different KV-head counts {kv} (SGLang: 'Variable GQA (VGQA) is not yet supported')")
    widths = [i for i, b in enumerate(blocks) if "intermediate_size" in b["ffn"]]
    if widths:
        reasons.append(f"the MLP widths of layers {widths} are not multiples of {FFN_MULT_MULTIPLE} (SGLang reads only "
                       f"ffn_mult, which gives such widths)")
    if getattr(config, "mlp_bias", False):
        reasons.append("its MLPs have biases (SGLang's DeciLM MLP has none)")
    return "; ".join(reasons) or None
