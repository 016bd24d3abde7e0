"""Write a structurally pruned model as a checkpoint that is physically smaller.

Three formats, each a Hugging Face directory with ``config.json``, safetensors weights, the tokenizer
files and ``surgeon_report.json`` (what was removed, how, and what was measured in the written
files), written atomically by :func:`export.checkpoint.write_atomically`:

- per-layer (default): ``model_type`` ``surgeon_<family>`` with per-layer sizes in the config
  (see ``base/modeling.py``) and a copy of that file as ``modeling_surgeon.py`` plus an
  ``auto_map``, so it loads with ``import surgeon`` (no code from the directory runs) or, without
  surgeon-export, with ``trust_remote_code=True``;
- uniform: the family's stock architecture with the same sizes in every layer, for unmodified
  transformers, vLLM or llama.cpp's converter (choose the sizes with
  :func:`export.shapes.uniform_plan` before shrinking). Written whenever every layer ends up with
  the same sizes and the stock config accepts them, asked for or not: a per-layer format that
  describes equal layers would only cost every other tool its support;
- Nemotron-NAS (``layout="nemotron-nas"``, asked for): NVIDIA's ``DeciLMForCausalLM`` layout with
  our config class beside it, which stock vLLM (and SGLang, for the shapes it reads) serves with
  nothing of ours installed; Llama and Mistral whose layers all have the same number of query heads
  (:mod:`export.nemotron_nas` says exactly which shapes fit, and refuses the others in one line).

Per-layer configs also carry transformers' ``per_layer_config`` mapping (``base/modeling.py``).
Both formats carry the keys transformers 4.x reads (:mod:`export.portable`) and a model card
(:mod:`export.card`).

The weights are moved into a skeleton of the target class built on the meta device from the new
config, with a strict ``load_state_dict``: a checkpoint whose config does not describe its tensors
is never written.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from base import modeling
from base.adapters import Adapter
from base.errors import SurgeonError
from base.formats import MODELING_FILE, REPORT_FILE
from base.loading import quiet_transformers
from base.surgery import (
    LayerCosts,
    LayerShape,
    RemovalPlan,
    grow_,
    layer_shapes,
    shrink_,
)
from export.card import write_card
from export.checkpoint import REPORT_VERSION, saved_accounting, write_atomically
from export.compress import find_zero_groups
from export.nemotron_nas import check_family, nas_layout
from export.portable import make_portable
from export.shapes import Rounding, align_plan, stock_config, uniform_plan

Layout = Literal["default", "nemotron-nas"]
LAYOUTS: tuple[str, ...] = ("default", "nemotron-nas")


@dataclass
class ShrinkConfig:
    """How to turn a plan into a smaller checkpoint."""

    align: int = 1  # round every kept size to a multiple of this (1: no rounding)
    rounding: Rounding = "up"  # which multiple --align picks: up (lossless for masked models), down, nearest
    uniform: bool = False  # same sizes in every layer, stock architecture
    check_tokens: int = 16  # measure the largest logit change on this many tokens (0: skip)
    layout: Layout = "default"  # default (per-layer, or stock where the layers are equal) or nemotron-nas

    def __post_init__(self) -> None:
        check_layout(self.layout, self.uniform)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_layer_config(model: nn.Module, adapter: Adapter) -> Any:
    """The ``surgeon_<family>`` config describing ``model``'s current per-layer sizes."""
    shapes = layer_shapes(model, adapter)
    hd = adapter.head_dim(model.config)
    d = _config(model).to_dict()
    config_cls, model_cls = adapter.per_layer_classes(str(d.pop("model_type")))
    for key in (*modeling.LAYER_FIELDS, "surgeon_format_version", "auto_map", "architectures",
                "transformers_version", "head_dim"):
        d.pop(key, None)
    config = config_cls(
        **d,
        head_dim=hd,
        **modeling.layer_fields(shapes),
        surgeon_format_version=modeling.FORMAT_VERSION,
    )
    module = Path(MODELING_FILE).stem
    config.auto_map = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    return config


def _skeleton_with_weights(model: nn.Module, config: Any) -> Any:
    """A model of ``config``'s class built on meta, holding ``model``'s tensors (strict)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    return skeleton


def save_pruned_checkpoint(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    out: Path,
    *,
    report: dict | None = None,
    uniform: bool = False,
    force: bool = False,
    source_dir: Path | None = None,
    layout: Layout = "default",
) -> dict:
    """Save a shrunk ``model`` (per-layer, uniform or Nemotron-NAS format) with its tokenizer; returns the report.

    Args:
        model: a causal LM after :func:`base.surgery.shrink_` (or any supported model).
        tokenizer: saved beside it.
        adapter: the model's layout.
        out: target directory (refused if not empty, unless ``force``).
        report: what the caller did (method, plan, manifest); measured sizes are added.
        uniform: write the stock architecture; every layer must then have the same sizes (without
            it the stock architecture is still written when the layers are equal and it fits).
        force: replace a non-empty ``out``.
        source_dir: the directory the model was loaded from (its card's lineage is inherited).
        layout: "nemotron-nas" writes NVIDIA's Nemotron-NAS layout (refused in one line where the shapes
            do not fit it, :func:`export.nemotron_nas.nas_layout`); "default" the formats above.

    Example:
        >>> save_pruned_checkpoint(model, tok, LLAMA, Path("small"), report={"method": "zeros"})  # doctest: +SKIP
    """
    check_layout(layout, uniform)
    shapes = layer_shapes(model, adapter)
    hd = adapter.head_dim(model.config)
    nas = nas_layout(model, adapter) if layout == "nemotron-nas" else None
    if nas is not None:
        config = per_layer_config(model, adapter)  # the weights' skeleton; config.json is the Nemotron-NAS one
    elif uniform:
        if len(set(shapes)) != 1:
            distinct = sorted({(s.intermediate_size, s.num_attention_heads, s.num_key_value_heads) for s in shapes})
            raise SurgeonError(
                "--uniform needs the same sizes in every layer; choose them with uniform_plan before shrinking "
                f"((MLP width, heads, KV heads) now: {distinct})"
            )
        config = stock_config(_config(model), adapter, shapes[0], hd)
    else:
        config = _stock_if_equal(model, adapter, shapes, hd) or per_layer_config(model, adapter)
    stock = nas is None and not str(config.model_type).startswith(modeling.MODEL_TYPE_PREFIX)
    dropped = nas.dropped if nas is not None else ()
    linears = {name: m for name, m in adapter.decoder_linears(model).items() if not name.startswith(dropped)}
    linear_names = list(linears)
    numel = sum(m.weight.numel() for m in linears.values())
    itemsize = next(model.parameters()).element_size()
    report = dict(report or {})
    if nas is not None:
        report["nemotron_nas"] = {"no_op_attention": nas.no_op_attention, "no_op_ffn": nas.no_op_ffn,
                                  "sglang": nas.sglang or "fits"}

    def fill(tmp: Path) -> None:
        skeleton = _skeleton_with_weights(model, config)
        if nas is None:
            skeleton.save_pretrained(tmp)
        else:  # without the tensors of no_op blocks, under the Nemotron-NAS config (all keys: no class defaults needed)
            skeleton.save_pretrained(tmp, state_dict={k: v for k, v in skeleton.state_dict().items()
                                                      if not k.startswith(dropped)})
            nas.config.to_json_file(tmp / "config.json", use_diff=False)
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        make_portable(tmp)  # with our code file beside a per-layer or Nemotron-NAS config
        report.update(
            format_version=REPORT_VERSION,
            checkpoint_format="nemotron-nas" if nas is not None else "uniform" if stock else "per-layer",
            model_type=nas.config.model_type if nas is not None else config.model_type,
            head_dim=hd,
            layers=[s.to_dict() for s in shapes],
            decoder_linear_bytes=numel * itemsize,
            **saved_accounting(tmp, linear_names, numel),
        )
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        write_card(tmp, title=f"{Path(out).name}: a physically smaller {adapter.family} model",
                   source=report.get("model"), report=report, source_dir=source_dir, tags=["structured-pruning"],
                   usage=_usage(stock, nas is not None))

    with torch.no_grad(), quiet_transformers():
        write_atomically(out, force, fill)
    return report


def check_layout(layout: str, uniform: bool) -> None:
    """Refuse an unknown layout, or two layouts at once, in one line."""
    if layout not in LAYOUTS:
        raise SurgeonError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if uniform and layout != "default":
        raise SurgeonError(f"--uniform writes the stock architecture and --layout {layout} another one: give one of them")


def _usage(stock: bool, nas: bool) -> list[str]:
    if nas:
        return ["NVIDIA's Nemotron-NAS layout (`DeciLMForCausalLM`, one `block_configs` entry per layer), with our "
                "config class in `configuration_nemotron_nas.py`: `vllm serve DIR --trust-remote-code` (or "
                "`vllm.LLM(DIR, trust_remote_code=True)`) with nothing of surgeon-export installed; SGLang where "
                "`surgeon_report.json`'s `nemotron_nas.sglang` says it fits. transformers and surgeon-export read "
                "the per-layer checkpoint this was written from, not this one."]
    if stock:
        return ["The family's stock architecture (every layer has the same sizes): plain "
                "`AutoModelForCausalLM.from_pretrained(DIR)` loads it, as do other tools that read the stock config."]
    return ["Layers of different sizes (`layer_intermediate_sizes`, `layer_num_attention_heads`, "
            "`layer_num_key_value_heads`, and transformers' `per_layer_config`): load with `import surgeon` then "
            "`AutoModelForCausalLM.from_pretrained(DIR)`, or without surgeon-export with `trust_remote_code=True` "
            "(runs the `modeling_surgeon.py` shipped here). `surgeon-export shrink DIR --uniform --out DIR2` "
            "pads every layer to the widest one (zeros, same outputs) for the stock architecture."]


def _stock_if_equal(model: nn.Module, adapter: Adapter, shapes: list, head_dim: int) -> Any | None:
    """The stock config when every layer has the same sizes and the stock config accepts them, else None."""
    if len(set(shapes)) != 1:
        return None
    try:
        return stock_config(_config(model), adapter, shapes[0], head_dim)
    except SurgeonError:
        return None


def shrink_and_save(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    out: Path,
    cfg: ShrinkConfig,
    *,
    plan: RemovalPlan | None = None,
    costs: dict[int, LayerCosts] | None = None,
    report: dict | None = None,
    force: bool = False,
    source_dir: Path | None = None,
) -> dict:
    """Shrink ``model`` in place by ``plan`` (default: its zero groups), then save it; returns the report.

    The plan is first adjusted by ``cfg`` (``uniform``: one size for all layers; ``align``: kept
    sizes rounded to multiples), choosing groups by ``costs`` (default: magnitude proxy).

    Example:
        >>> shrink_and_save(lm.model, lm.tokenizer, lm.adapter, Path("small"), ShrinkConfig(align=64))  # doctest: +SKIP
    """
    if cfg.layout == "nemotron-nas":
        check_family(_config(model))  # the family before any work; the shapes once shrunk
    before = sum(m.weight.numel() for m in adapter.decoder_linears(model).values())
    ids = _check_ids(model, cfg.check_tokens)
    reference = _logits(model, ids)
    if cfg.uniform and len(set(layer_shapes(model, adapter))) > 1:
        if plan is not None:
            raise SurgeonError("--uniform from layers of different sizes works on their zero groups only, not a given plan")
        grow_(model, adapter, _common_shape(model, adapter))  # zeros: the same function, up to float32 rounding
    plan = plan if plan is not None else find_zero_groups(model, adapter)
    if cfg.uniform:
        plan = uniform_plan(model, adapter, plan, costs, multiple=cfg.align)
    elif cfg.align > 1:
        plan = align_plan(model, adapter, plan, cfg.align, costs, cfg.rounding)
    manifest = shrink_(model, adapter, plan)
    after = sum(m.weight.numel() for m in adapter.decoder_linears(model).values())
    shrunk = _logits(model, ids)
    full = {
        **(report or {}),
        "shrink": {
            **cfg.to_dict(),
            "decoder_linear_params_before": before,
            "decoder_linear_params_after": after,
            "remaining_fraction": after / before,
            "max_logit_change": _max_change(reference, shrunk),
            "manifest": manifest.to_dict(),
        },
    }
    return save_pruned_checkpoint(model, tokenizer, adapter, out, report=full, uniform=cfg.uniform, force=force,
                                  source_dir=source_dir, layout=cfg.layout)


def _common_shape(model: nn.Module, adapter: Adapter) -> LayerShape:
    """Sizes every layer fits in: the config's global (unpruned) sizes, or the largest layer's where larger."""
    shapes = layer_shapes(model, adapter)
    heads, kv, _ = adapter.head_layout(_config(model))
    width = max(int(getattr(_config(model), adapter.intermediate_key)), *(s.intermediate_size for s in shapes))
    kv = max(kv, *(s.num_key_value_heads for s in shapes))
    group = max(heads // kv, *(s.num_attention_heads // s.num_key_value_heads for s in shapes))
    return LayerShape(width, kv * group, kv)


def _check_ids(model: nn.Module, n: int) -> torch.Tensor | None:
    """``n`` fixed token ids spread over the vocabulary, as ``[1, n]`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    vocab = int(_config(model).vocab_size)
    return (torch.arange(n) * 7919 % vocab)[None].to(next(model.parameters()).device)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor | None) -> torch.Tensor | None:
    return None if ids is None else model(ids).logits.float()


def _max_change(reference: torch.Tensor | None, shrunk: torch.Tensor | None) -> float | None:
    if reference is None or shrunk is None:
        return None
    change = float((shrunk - reference).abs().max())  # NaN propagates through torch's max
    if not math.isfinite(change):
        raise SurgeonError(f"the model's logits are not finite before or after shrinking (largest change {change})")
    return change


def _config(model: nn.Module) -> Any:
    return model.config
