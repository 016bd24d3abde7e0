"""Export a causal LM to an ONNX decoder graph with KV cache, checked against torch before it is kept.

``surgeon-export onnx MODEL --out DIR`` writes, atomically (:func:`export.checkpoint.write_atomically`):

- ``model.onnx`` (weights in ``model.onnx_data`` when large): the graph of ``export/onnx_graph.py``
  (optimum's input/output names and dynamic axes, per-layer KV head counts, an optional
  ``num_logits_to_keep`` input), traced with the TorchScript exporter over HF's eager attention
  math (grouped KV heads broadcast, not copied), its shape arithmetic folded into constants
  (``export/onnx_simplify.py``), passing ``onnx.checker``'s full check;
- ``config.json``, ``generation_config.json`` and the tokenizer files, as optimum lays them out
  (plus ``modeling_surgeon.py`` for per-layer-shape configs, and the source's ``surgeon_report.json``);
- ``surgeon_onnx.json``: the graph's inputs and outputs, per-layer KV heads, and what was measured in
  the written file: zeros and 2:4 blocks of every decoder linear counted in its initializer, and
  the largest logit difference between ONNX Runtime and torch on a prompt with and without past.

Weights are written as they are: a decoder linear ``W`` ``[out, in]`` becomes the ``MatMul``
initializer ``W.T`` ``[in, out]`` (named ``<module>.weight.T``; OPT's MLP: a ``Gemm`` reading ``W``
as stored, ``<module>.weight``), so zeros, unstructured sparsity and the 2:4 pattern (along the
input, the reduction axis of either op) survive exactly, for engines such as TensorRT that exploit
them. A tied LM head reads the embedding matrix itself (one initializer). ``optimize`` additionally
runs onnxruntime's transformer optimizer (RMSNorm and skip-connection fusions into operators only
ONNX Runtime knows; ``onnx.checker`` runs before it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from base.adapters import Adapter, get_adapter
from base.env import _version
from base.errors import SurgeonError, first_line
from base.formats import (
    DTYPES,
    ONNX_DATA_FILE,
    ONNX_FILE,
    ONNX_MANIFEST_FILE,
    REPORT_FILE,
)
from base.loading import quiet_transformers
from export.card import write_card
from export.checkpoint import prepare_target, write_atomically
from export.onnx_graph import (
    KEEP,
    DecoderWithPast,
    GraphSpec,
    dummy_inputs,
    graph_spec,
    is_per_layer,
    register_attention,
    uniform_config,
)
from export.onnx_simplify import fold_shapes, initializer_nbytes
from export.portable import make_portable

MANIFEST_VERSION = 1
MIN_OPSET = 14  # the range tested and documented (the TorchScript exporter writes 7-20; the graph needs about 11)
MAX_OPSET = 20
AUTO_EXTERNAL_BYTES = 1 << 30  # protobuf files stop at 2 GiB: above 1 GiB of weights, use model.onnx_data
# Largest allowed |logit difference| per unit of the largest |logit| (at least 1). On SmolLM2-135M
# (logits up to ~33) torch's own sdpa and eager paths differ by up to ~3e-4 in float32, so an
# absolute bound would sit below float32's rounding; tiny test models stay near 1e-6.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}

Dtype = Literal["float32", "float16"]
ExternalData = Literal["auto", "always", "never"]
ONNX_DTYPES = ("float32", "float16")  # what the graph stores (weights and KV cache)
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights, not shapes


@dataclass
class OnnxConfig:
    """How to export: opset, weight dtype, weight file layout, optional fusions, verification."""

    opset: int = 17
    dtype: Dtype = "float32"
    external_data: ExternalData = "auto"  # auto: weights in model.onnx_data above AUTO_EXTERNAL_BYTES
    simplify: bool = True  # fold the traced shape arithmetic into constant shapes (export/onnx_simplify.py)
    optimize: bool = False  # onnxruntime transformer optimizer (com.microsoft fused operators)
    verify: bool = True  # compare ONNX Runtime with torch after writing; refuse to keep a mismatch
    # Per-layer-shape models: pad every layer's KV cache to one head count at the graph boundary and
    # write the stock family's config, so tools that size the cache from the config (optimum's
    # ORTModelForCausalLM) run the graph. Off by default: our runtimes read each layer's shape from
    # the graph, and the padding costs memory and copies where a layer has fewer KV heads (docs/onnx.md).
    uniform_cache: bool = False

    def validate(self) -> None:
        """Refuse impossible settings before anything is traced."""
        if self.dtype not in ONNX_DTYPES:
            raise SurgeonError(f"--dtype must be one of {', '.join(ONNX_DTYPES)}, got {self.dtype!r}")
        if self.external_data not in ("auto", "always", "never"):
            raise SurgeonError(f"--external-data must be auto, always or never, got {self.external_data!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise SurgeonError(f"--opset must be {MIN_OPSET} to {MAX_OPSET}, got {self.opset}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    cfg: OnnxConfig | None = None,
    *,
    source: str = "",
    source_dir: Path | None = None,
    force: bool = False,
) -> dict:
    """Write ``model`` as an ONNX decoder with KV cache to the directory ``out``; returns the manifest.

    Args:
        model: a causal LM of a supported family (stock or ``surgeon_*`` per-layer shapes), on
            CPU; it is traced with eager attention and left as it was (float16 converts a copy).
        tokenizer: saved beside the graph.
        out: target directory; refused if it is not empty, unless ``force``.
        cfg: opset, dtype, external data, optimisation, verification.
        source: what the model was loaded from, for the manifest.
        source_dir: the checkpoint directory, whose ``surgeon_report.json`` (if any) is copied.

    Example:
        >>> lm = load_model("small")  # doctest: +SKIP
        >>> export_onnx(lm.model, lm.tokenizer, Path("small-onnx"))["verification"]["max_abs_diff"]  # doctest: +SKIP
        2.1e-06
    """
    cfg = cfg or OnnxConfig()
    cfg.validate()
    out = out.expanduser()
    prepare_target(out, force)
    adapter = get_adapter(str(model.config.model_type))  # type: ignore[union-attr]
    dtype = DTYPES[cfg.dtype]
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    model.eval()
    spec = graph_spec(model, adapter, cfg.uniform_cache)

    def fill(tmp: Path) -> None:
        start = time.perf_counter()
        proto = _trace(model, spec, cfg.opset, tmp / ".trace")
        linears = _name_linear_initializers(proto, model, adapter)
        _declare_cache_dims(proto, spec)
        simplified = fold_shapes(proto) if cfg.simplify else None
        weight_bytes = sum(initializer_nbytes(t) for t in proto.graph.initializer)
        external = cfg.external_data == "always" or (cfg.external_data == "auto" and weight_bytes > AUTO_EXTERNAL_BYTES)
        _save(proto, tmp / ONNX_FILE, external)
        del proto
        _check(tmp / ONNX_FILE)  # before fusion: onnx.checker does not know onnxruntime's fused operators
        if cfg.optimize:
            _optimize(tmp / ONNX_FILE, model.config, external)
        manifest = _manifest(tmp, model, adapter, spec, cfg, linears, source)
        manifest["graph"]["simplified"] = simplified
        if cfg.verify:
            manifest["verification"] = verify(tmp, model, spec, cfg.dtype)
        manifest["export_seconds"] = time.perf_counter() - start
        _write_beside(tmp, model, tokenizer, source_dir, spec)
        (tmp / ONNX_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _write_card(tmp, out, manifest, source, source_dir)

    with torch.no_grad(), quiet_transformers(), export_attention(model):
        write_atomically(out, force, fill)
    return json.loads((out / ONNX_MANIFEST_FILE).read_text())


@contextmanager
def export_attention(model: nn.Module) -> Iterator[None]:
    """Trace :func:`export.onnx_graph.grouped_attention` (eager's math), then restore the model's own.

    Not sdpa: torch's TorchScript symbolic for ``scaled_dot_product_attention`` returns float32
    from float16 inputs, which turns the following ``o_proj`` weight into a float32 initializer,
    and repeats every key and value over its query group.
    """
    config: Any = model.config
    previous = config._attn_implementation
    model.set_attn_implementation(register_attention())  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(previous)  # type: ignore[operator]


def _trace(model: nn.Module, spec: GraphSpec, opset: int, workdir: Path) -> Any:
    """Trace the wrapper with the TorchScript exporter; returns the model proto with its weights."""
    import onnx

    workdir.mkdir()
    wrapper = DecoderWithPast(model, spec).eval()
    args = dummy_inputs(model, spec)
    path = workdir / ONNX_FILE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks that are constant by design
            torch.onnx.export(wrapper, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True,
                              dynamo=False)
    except torch.onnx.errors.OnnxExporterError as exc:  # an operator the exporter cannot write at this opset
        message = first_line(exc).split(" [Caused by")[0].removeprefix("Unsupported: ").strip()
        if isinstance(exc, torch.onnx.errors.UnsupportedOperatorError) or "opset" in message.lower():
            raise SurgeonError(f"opset {opset} is too old for this graph: {message}") from None
        raise SurgeonError(f"ONNX export failed: {message}") from None
    proto = onnx.load(str(path))  # loads external data too (the exporter uses it above 2 GiB)
    shutil.rmtree(workdir)
    default = onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), KEEP)
    proto.graph.initializer.append(default)  # an input with an initializer: optional, 0 unless fed
    return proto


def _tensor_key(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _name_linear_initializers(proto: Any, model: nn.Module, adapter: Adapter) -> dict[str, dict]:
    """Name each decoder linear's weight initializer after its module; returns module -> where it is.

    The exporter writes ``nn.Linear`` on a 3-D input as ``MatMul`` with ``W.T`` ``[in, out]`` under
    a generated name (renamed ``<module>.weight.T``), and on a 2-D input with a bias (OPT's MLP) as
    ``Gemm(transB=1)`` reading ``W`` ``[out, in]`` as stored (``<module>.weight``). Both are found by
    content (shape and hash).
    """
    from onnx import numpy_helper

    wanted: dict[tuple, list[tuple[str, bool]]] = {}
    for name, linear in adapter.decoder_linears(model).items():
        W = linear.weight.detach().cpu()  # [out, in]
        for transposed, array in ((False, W.numpy()), (True, W.T.contiguous().numpy())):
            wanted.setdefault(_tensor_key(array), []).append((name, transposed))
    shapes = {key[0] for key in wanted}
    renamed: dict[str, str] = {}
    found: dict[str, dict] = {}
    for init in proto.graph.initializer:
        if tuple(init.dims) not in shapes:
            continue
        owners = wanted.get(_tensor_key(numpy_helper.to_array(init)))
        if not owners:
            continue
        module, transposed = owners[0]
        new = f"{module}.weight.T" if transposed else f"{module}.weight"
        renamed[init.name] = new
        init.name = new
        found.update({m: {"initializer": new, "layout": "[in, out]" if t else "[out, in]"} for m, t in owners})
    for node in proto.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    missing = [name for name in adapter.decoder_linears(model) if name not in found]
    if missing:
        raise RuntimeError(f"the exported graph has no initializer holding {missing[0]}.weight")
    return found


def _declare_cache_dims(proto: Any, spec: GraphSpec) -> None:
    """Write each present output's static head count and size into the graph's declared shape.

    The exporter cannot infer them through the uniform cache's ``Pad`` (its pads are computed at
    run time) and leaves symbolic names; tools read the declared shapes.
    """
    for output in proto.graph.output:
        if output.name.startswith("present."):
            dims = output.type.tensor_type.shape.dim
            dims[1].dim_value = spec.past_shape(0, 1, 0)[1] if spec.cache_heads else spec.kv_heads[int(output.name.split(".")[1])]
            dims[3].dim_value = spec.head_dim


def _optimize(path: Path, config: Any, external: bool) -> None:
    """Rewrite ``path`` with onnxruntime's transformer optimizer (graph fusions only, no session rewrites)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(onnx.load(str(path)), model_type="gpt2", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=0, use_gpu=False)
    for file in (path, path.with_name(ONNX_DATA_FILE)):
        file.unlink(missing_ok=True)
    _save(optimized.model, path, external)


def _save(proto: Any, path: Path, external: bool) -> None:
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=ONNX_DATA_FILE, size_threshold=1024)


def _check(path: Path) -> None:
    """``onnx.checker`` full check (with strict shape inference) on the written file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"the exported graph fails onnx.checker: {first_line(exc)}") from None


def linear_sparsity(W: np.ndarray) -> dict[str, int]:
    """Zeros of a weight ``W`` ``[out, in]`` and its 2:4 blocks along ``in`` (4 weights, at least 2 zero)."""
    zeros = int((W == 0).sum())
    d_out, d_in = W.shape
    if d_in % 4:
        return {"zeros": zeros, "blocks": 0, "blocks_2_4": 0}
    blocks = (W.reshape(d_out, d_in // 4, 4) == 0).sum(axis=2)  # [out, in/4] zeros per block
    return {"zeros": zeros, "blocks": int(blocks.size), "blocks_2_4": int((blocks >= 2).sum())}


def _manifest(directory: Path, model: nn.Module, adapter: Adapter, spec: GraphSpec, cfg: OnnxConfig,
              linears: dict[str, dict], source: str) -> dict:
    """What the written graph holds, measured in the written file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(directory / ONNX_FILE))
    inits = {t.name: t for t in proto.graph.initializer}
    per_linear = {}
    for module, where in linears.items():
        array = numpy_helper.to_array(inits[where["initializer"]])
        W = array.T if where["layout"] == "[in, out]" else array  # [out, in]
        per_linear[module] = {**where, "shape": list(array.shape), **linear_sparsity(W)}
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in inits.values() if t.data_type in FLOAT_TYPES)
    lin_params = sum(int(np.prod(v["shape"])) for v in per_linear.values())
    lin_zeros = sum(v["zeros"] for v in per_linear.values())
    blocks = sum(v["blocks"] for v in per_linear.values())
    files = [f for f in (directory / ONNX_FILE, directory / ONNX_DATA_FILE) if f.is_file()]
    return {
        "format_version": MANIFEST_VERSION,
        "source": source,
        "model_type": str(model.config.model_type),  # type: ignore[union-attr]
        "family": adapter.family,
        "per_layer_shapes": is_per_layer(model.config),
        "config": cfg.to_dict(),
        "graph": {**spec.to_dict(), "dtype": cfg.dtype, "opset": cfg.opset,
                  "inputs": [_value_info(v) for v in proto.graph.input],
                  "outputs": [_value_info(v) for v in proto.graph.output],
                  "external_data": ONNX_DATA_FILE if (directory / ONNX_DATA_FILE).is_file() else None},
        "parameters": {"total": params, "decoder_linear": lin_params, "decoder_linear_zeros": lin_zeros},
        "sparsity": lin_zeros / lin_params,
        "blocks_2_4": {"blocks": blocks, "with_two_zeros": sum(v["blocks_2_4"] for v in per_linear.values())},
        "decoder_linears": per_linear,
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "versions": {p: _version(p) for p in ("torch", "transformers", "onnx", "onnxruntime", "optimum")},
    }


def _value_info(value: Any) -> dict:
    from onnx import helper

    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": dims}


@torch.no_grad()
def verify(directory: Path, model: nn.Module, spec: GraphSpec, dtype: Dtype) -> dict:
    """Largest logit difference, ONNX Runtime vs torch, over a padded prefill and a step with past.

    Raises RuntimeError above :data:`TOLERANCE` times the largest |logit| (at least 1), so a wrong
    graph is never kept.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: the optional num_logits_to_keep input draws a warning
    session = ort.InferenceSession(str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    wrapper = DecoderWithPast(model, spec).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (2, 7), generator=gen)  # [B, T]: prefill 5, then 2 with past
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row; padded positions are not compared
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    past_np = [np.zeros(spec.past_shape(i // 2, 2, 0), dtype=np_dtype) for i in range(2 * spec.num_layers)]
    past_pt = [torch.from_numpy(p) for p in past_np]
    worst, scale = 0.0, 0.0
    for lo, hi, keep in ((0, 5, 0), (5, 7, 1)):  # the first step leaves num_logits_to_keep at its default
        feed = {"input_ids": ids[:, lo:hi].numpy(), "attention_mask": mask[:, :hi].numpy(),
                "position_ids": positions[:, lo:hi].numpy(), **dict(zip(spec.past_names, past_np))}
        if keep:
            feed[KEEP] = np.array(keep, dtype=np.int64)
        got = [torch.from_numpy(g).float() for g in session.run(None, feed)]
        want = [w.float() for w in wrapper(ids[:, lo:hi], mask[:, :hi], positions[:, lo:hi], *past_pt, torch.tensor(keep))]
        query, keys = mask[:, lo:hi][:, -keep:].bool(), mask[:, :hi].bool()  # [B, K], [B, P + T]
        if got[0].shape != want[0].shape:
            raise RuntimeError(f"ONNX Runtime returned logits {list(got[0].shape)}, torch {list(want[0].shape)}")
        worst = _worse(worst, float((got[0] - want[0])[query].abs().max()))  # logits [B, K, V]
        for g, w in zip(got[1:], want[1:]):  # presents [B, kv_i, P + T, hd]
            worst = _worse(worst, float((g - w).transpose(1, 2)[keys].abs().max()))
        scale = _worse(scale, float(want[0][query].abs().max()))
        past_np = [g.numpy().astype(np_dtype) for g in got[1:]]
        past_pt = [w.to(DTYPES[dtype]) for w in want[1:]]
    if math.isnan(scale) or math.isnan(worst):
        raise RuntimeError("ONNX Runtime or torch returned NaN logits or cache values; the graph was not kept")
    limit = TOLERANCE[dtype] * max(scale, 1.0)
    if not worst <= limit:
        raise RuntimeError(f"ONNX Runtime and torch disagree by {worst:.3g} (limit {limit:.3g}); the graph was not kept")
    return {"max_abs_diff": worst, "limit": limit, "max_abs_logit": scale, "prompt": "2x5 (one row padded), then 2 with past and num_logits_to_keep=1"}


def _worse(worst: float, value: float) -> float:
    """The larger difference, NaN winning (Python's ``max(worst, nan)`` keeps ``worst``, hiding it)."""
    return value if math.isnan(value) or value > worst else worst


def _write_beside(directory: Path, model: nn.Module, tokenizer: Any, source_dir: Path | None, spec: GraphSpec) -> None:
    """config.json, generation_config.json, tokenizer files, and the per-layer modeling file.

    A uniform-cache graph gets the stock family's config instead (:func:`export.onnx_graph.uniform_config`).
    """
    from transformers import GenerationConfig

    config: Any = model.config
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    generation.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if spec.cache_heads:
        (directory / "config.json").write_text(json.dumps(uniform_config(config, spec), indent=2, sort_keys=True) + "\n")
    if source_dir is not None and (source_dir / REPORT_FILE).is_file():
        shutil.copyfile(source_dir / REPORT_FILE, directory / REPORT_FILE)
    make_portable(directory)  # with modeling_surgeon.py beside a per-layer config


def _write_card(directory: Path, out: Path, manifest: dict, source: str | None, source_dir: Path | None) -> None:
    """The model card: the source's pruning report, plus this export's dtype and measured parity."""
    report = json.loads((directory / REPORT_FILE).read_text()) if (directory / REPORT_FILE).is_file() else {}
    check = manifest.get("verification") or {}
    notes = [f"ONNX decoder with KV cache ({manifest.get('config', {}).get('dtype', '?')}), opset "
             f"{manifest.get('config', {}).get('opset', '?')}"]
    if check.get("max_abs_diff") is not None:
        notes.append(f"largest logit difference against torch, measured at export: {check['max_abs_diff']:.3g}")
    write_card(directory, title=f"{out.name}: ONNX export", source=source, report=report, source_dir=source_dir,
               library="onnxruntime", tags=["onnx"], notes=notes,
               usage=["`surgeon-export generate DIR --backend onnxruntime`, or optimum's ORTModelForCausalLM "
                      "(optimum's input and output names)."])
