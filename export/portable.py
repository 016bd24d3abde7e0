"""Make a written checkpoint read the same in both transformers generations (4.x and 5.x), with no missing code.

transformers 5 saves RoPE settings only under ``rope_parameters`` and names the tokenizer class
``TokenizersBackend``. transformers 4.57 reads neither: it falls back to ``rope_theta`` 10,000
without a warning (SmolLM2 uses 100,000, so every logit changes) and cannot resolve the tokenizer
class. Every writer calls :func:`make_portable` on its output directory before the atomic rename, so
the files carry both spellings:

- ``config.json``: ``rope_theta`` (and ``rope_scaling`` when the RoPE type is not ``default``) at the
  top level, copied from ``rope_parameters``; for configs with one RoPE setting per attention type
  (Gemma 2/3), the full-attention one, plus the sliding one under the key its adapter names
  (Gemma 3's ``rope_local_base_freq``).
  transformers 5 reads ``rope_parameters`` first, so the copies change nothing there.
- ``tokenizer_config.json``: ``tokenizer_class`` ``PreTrainedTokenizerFast`` instead of
  ``TokenizersBackend``. Both load the same ``tokenizer.json``; in transformers 5 the name is an
  alias of ``TokenizersBackend``, in 4.57 it is the generic fast tokenizer, and that one returns
  ``token_type_ids`` unless told otherwise, which ``model.generate(**tokenizer(prompt))`` then
  refuses (``model_kwargs are not used: ['token_type_ids']``). So the file also names the inputs
  a causal LM takes, ``model_input_names: ["input_ids", "attention_mask"]``, in both generations.

Every directory also gets its code right: a per-layer config (``surgeon_*``) gets our own
``base/modeling.py`` as ``modeling_surgeon.py``, a Nemotron-NAS config our own ``base/nemotron_nas.py``
as ``configuration_nemotron_nas.py`` (never a copy of a source's file, which anyone may have changed
and which would run under ``trust_remote_code=True``), and every ``auto_map`` entry
(``config.json``, ``tokenizer_config.json``) whose code file is not in the directory, or lives in
another repository (``repo--module.Class``), is dropped: the output never points at missing code.

Checked for real in ``benchmarks/results/transformers_457_check.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from base import modeling, nemotron_nas
from base.adapters import find_model_type
from base.formats import MODELING_FILE, NAS_CONFIG_FILE

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # what a causal LM's forward and generate take
V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
FULL, SLIDING = "full_attention", "sliding_attention"


def legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level RoPE keys transformers 4.x reads, derived from a 5.x ``rope_parameters`` (may be empty)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    if FULL in params or SLIDING in params:  # one setting per attention type
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
        model_type = find_model_type(str(config.get("model_type", "")))
        local_key = model_type.rope_local_base_key if model_type is not None else None
        if "rope_theta" in sliding and local_key is not None:
            out[local_key] = sliding["rope_theta"]
        params = full or sliding
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        out["rope_scaling"] = {**scaling, "rope_type": rope_type, "type": rope_type}
    return out


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the 4.x RoPE keys added (existing top-level values must agree)."""
    extra = legacy_rope_keys(config)
    for key, value in extra.items():
        if key in config and config[key] is not None and config[key] != value:
            raise ValueError(f"config.json: {key} {config[key]!r} disagrees with rope_parameters ({value!r})")
    return {**config, **extra}


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config`` with a tokenizer class both generations resolve, returning only the inputs a causal LM takes."""
    out = {**config, "model_input_names": MODEL_INPUT_NAMES}
    if config.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    return out


def present_code(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``config`` without the ``auto_map`` entries whose code is not a file in ``directory``.

    Example:
        >>> present_code({"auto_map": {"AutoConfig": "configuration_x.XConfig"}, "model_type": "x"}, Path("/nonexistent"))
        {'model_type': 'x'}
    """
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return config

    def here(ref: object) -> bool:  # "module.Class"; a tokenizer's entry is a [slow, fast] pair, either may be None
        if isinstance(ref, (list, tuple)):
            return all(r is None or here(r) for r in ref)
        return (isinstance(ref, str) and "--" not in ref and "." in ref
                and (directory / (ref.rsplit(".", 1)[0].replace(".", "/") + ".py")).is_file())

    kept = {k: v for k, v in auto_map.items() if here(v)}
    out = {k: v for k, v in config.items() if k != "auto_map"}
    return {**out, "auto_map": kept} if kept else out


def _own_code(model_type: str) -> tuple[Path, str] | None:
    """Our source file a config of ``model_type`` needs beside it, and its name there (None: none)."""
    if model_type.startswith(modeling.MODEL_TYPE_PREFIX):
        return Path(modeling.__file__), MODELING_FILE
    if model_type == nemotron_nas.MODEL_TYPE:
        return Path(nemotron_nas.__file__), NAS_CONFIG_FILE
    return None


def make_portable(directory: Path) -> None:
    """Rewrite ``config.json`` and ``tokenizer_config.json`` in ``directory`` (where present) as above,
    after copying our code file beside a config that needs one (:func:`_own_code`)."""
    config = directory / "config.json"
    code = _own_code(str(json.loads(config.read_text()).get("model_type", ""))) if config.is_file() else None
    if code is not None:
        shutil.copyfile(code[0], directory / code[1])
    for name, convert in (("config.json", portable_config), ("tokenizer_config.json", portable_tokenizer_config)):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        new = present_code(convert(data), directory)
        if new != data:
            path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
