"""Compressed checkpoint directories: decoder linears as N:M (2:4), CSR or BSR parts in one safetensors file.

A directory written by :func:`pack_checkpoint` (``surgeon-export pack``), atomically:

- ``config.json``, ``generation_config.json`` and the tokenizer files, as in any Hugging Face checkpoint
  (``modeling_surgeon.py`` and ``surgeon_report.json`` are copied from the source when present);
- ``model.sparse.safetensors``: every decoder linear's weight packed (``export/semi_structured.py``,
  ``export/sparse_csr.py``), every other tensor dense. A packed weight ``KEY`` is stored as the
  tensors ``KEY.PART`` (e.g. ``model.layers.0.mlp.up_proj.weight.values``); the header's
  ``__metadata__`` (strings only) holds ``format``, ``format_version``, ``layout`` and ``packed``,
  a JSON object ``KEY -> {"layout", "shape", "dtype"[, "blocksize"]}``. Nothing in it executes;
- ``surgeon_sparse.json`` (manifest: format, version, layout, dtype, sizes, and the SHA-256 of every
  stored tensor's bytes, checked on every read) and ``README.md`` say
  what the directory is. There is no ``model.safetensors``, so plain transformers refuses the
  directory rather than initialising weights at random; :func:`densify` (``surgeon-export densify``)
  writes a normal checkpoint from it.

Every reader goes through :func:`read_compressed`, which checks the manifest, each tensor's checksum (a
pack written before checksums were recorded loads with a warning), the file, the
metadata and every tensor's shape against the model ``config.json`` describes (built on the meta
device), and names the tensor at fault.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from base.errors import SurgeonError
from base.files import read_json
from base.formats import DTYPES, MODELING_FILE, PACK_MANIFEST_FILE, PACK_WEIGHTS_FILE, dtype_name
from base.integrity import tensor_checksums, verify_checksums
from base.loading import (
    LoadedModel,
    check_safetensors,
    check_shapes,
    config_errors,
    error_reason,
    quiet_transformers,
    read_config,
)
from base.patterns import NMPattern
from export.card import write_card
from export.checkpoint import REPORT_FILE, write_atomically
from export.portable import make_portable
from export.semi_structured import check_nm, pack_24, pack_nm, unpack_24, unpack_nm
from export.sparse_csr import PARTS, pack_bsr, pack_csr, unpack_compressed

FORMAT = "surgeon-sparse"
FORMAT_VERSION = 1
README_FILE = "README.md"
OWN_FILES = (PACK_WEIGHTS_FILE, PACK_MANIFEST_FILE, README_FILE)
EXTRA_FILES = (REPORT_FILE,)  # copied from the source directory when present
# Never copied: a per-layer directory gets our own base/modeling.py (:func:`export.portable.make_portable`), not the
# source's file, which may have been changed by anyone and would run under trust_remote_code=True.
NOT_COPIED = (*OWN_FILES, MODELING_FILE)
log = logging.getLogger(__name__)
LAYOUTS: tuple[str, ...] = ("2:4", "csr", "bsr")  # and any other N:M as "K:M" (4:8, 1:4, ...)


def nm_pattern(layout: object) -> NMPattern | None:
    """The N:M pattern a layout name ``"K:M"`` stands for; None for csr, bsr and anything else."""
    if not isinstance(layout, str) or layout.count(":") != 1:
        return None
    try:
        return NMPattern.parse(layout)
    except SurgeonError:
        return None


def is_layout(layout: object) -> bool:
    return layout in LAYOUTS or nm_pattern(layout) is not None


def layout_parts(layout: str) -> tuple[str, ...]:
    """The tensors a packed weight of ``layout`` is stored as (``KEY.PART``)."""
    if layout == "2:4":
        return ("values", "meta")
    return PARTS if layout in ("csr", "bsr") else ("values", "mask")


@dataclass
class PackConfig:
    """How ``surgeon-export pack`` writes the decoder linears."""

    layout: str = "2:4"  # "K:M" (2:4, 4:8, 1:4, ...), "csr" or "bsr"
    dtype: str | None = None  # float32, float16 or bfloat16; None keeps the loaded dtype
    blocksize: tuple[int, int] = (4, 4)  # BSR block (rows, cols)

    def __post_init__(self) -> None:
        if not is_layout(self.layout):
            raise SurgeonError(f"--format must be 2:4 (or another N:M such as 4:8), csr or bsr, got {self.layout!r}")
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise SurgeonError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackedTensor:
    """One packed weight: its parts as stored, and what the metadata says it is."""

    key: str
    layout: str
    shape: tuple[int, int]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor]
    blocksize: tuple[int, int] | None = None

    def dense(self) -> torch.Tensor:
        """The dense ``[R, C]`` weight (parts checked first)."""
        if self.layout == "2:4":
            return unpack_24(self.parts["values"], self.parts["meta"], self.shape, self.dtype, self.key)
        pattern = nm_pattern(self.layout)
        if pattern is not None:
            return unpack_nm(self.parts["values"], self.parts["mask"], self.shape, self.dtype, pattern, self.key)
        return self.sparse().to_dense()

    def sparse(self) -> torch.Tensor:
        """The weight as a checked torch sparse CSR or BSR tensor (not for N:M)."""
        if nm_pattern(self.layout) is not None:
            raise ValueError("N:M weights load dense, or as semi-structured tensors (runtime/semi_structured.py)")
        return unpack_compressed(self.parts, self.shape, self.dtype, self.key, self.blocksize)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def header(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"layout": self.layout, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        if self.blocksize is not None:
            entry["blocksize"] = list(self.blocksize)
        return entry


@dataclass
class CompressedCheckpoint:
    """A checked compressed directory: config, manifest, dense tensors and packed weights."""

    directory: Path
    config: dict
    manifest: dict
    dense: dict[str, torch.Tensor]
    packed: dict[str, PackedTensor]
    skeleton: nn.Module = field(repr=False)  # the model config.json describes, on the meta device


def pack_tensor(W: torch.Tensor, key: str, cfg: PackConfig) -> PackedTensor:
    """Pack one 2-D weight in ``cfg.layout`` (N:M is checked first: a SurgeonError names the row)."""
    shape = (int(W.shape[0]), int(W.shape[1]))
    if cfg.layout == "2:4":
        values, meta = pack_24(W, key)
        return PackedTensor(key, "2:4", shape, W.dtype, {"values": values, "meta": meta})
    pattern = nm_pattern(cfg.layout)
    if pattern is not None:
        values, mask = pack_nm(W, pattern, key)
        return PackedTensor(key, cfg.layout, shape, W.dtype, {"values": values, "mask": mask})
    if cfg.layout == "csr":
        return PackedTensor(key, "csr", shape, W.dtype, pack_csr(W))
    block = (int(cfg.blocksize[0]), int(cfg.blocksize[1]))
    return PackedTensor(key, "bsr", shape, W.dtype, pack_bsr(W, block, key), block)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (the first name wins: embeddings before the LM head)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach()
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor.contiguous()
    cast = tensor.to(dtype).contiguous()
    if bool(torch.isfinite(tensor).all()) and not bool(torch.isfinite(cast).all()):
        raise SurgeonError(f"{key}: values overflow {dtype_name(dtype)} (largest |w| = {float(tensor.abs().max()):.4g})")
    return cast


def pack_checkpoint(lm: LoadedModel, out: Path, cfg: PackConfig, *, force: bool = False) -> dict:
    """Write ``lm`` as a compressed directory at ``out``; returns the manifest (with measured sizes).

    Every decoder linear's pattern is checked in the tensors being written (N:M: at least M - N
    zeros in every M consecutive inputs), never taken from the pruner's word; the written file is read back
    and every packed weight compared with its source before the directory is renamed into place.

    Args:
        lm: a model from :func:`base.loading.load_model`.
        out: target directory (refused if not empty, unless ``force``).
        cfg: layout, dtype and BSR block size.

    Example:
        >>> pack_checkpoint(load_model("m24"), Path("m24-packed"), PackConfig("2:4", "float16"))  # doctest: +SKIP
    """
    model: Any = lm.model  # a transformers PreTrainedModel
    state = _unique_state(model)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else next(iter(state.values())).dtype
    keys = [f"{name}.weight" for name in lm.adapter.decoder_linears(model)]
    state = {k: _cast(v, dtype, k) for k, v in state.items()}
    pattern = nm_pattern(cfg.layout)
    if pattern is not None:
        failing = []
        for key in keys:
            try:
                check_nm(state[key], pattern, key)
            except SurgeonError as exc:
                failing.append(str(exc))
        if failing:
            raise SurgeonError(f"{failing[0]} ({len(failing)} of {len(keys)} decoder linears are not {pattern})")
    packed = {key: pack_tensor(state[key], key, cfg) for key in keys}
    tensors = {k: v for k, v in state.items() if k not in packed}
    for key, p in packed.items():
        tensors.update({f"{key}.{part}": t for part, t in p.parts.items()})
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layout": cfg.layout,
              "packed": json.dumps({k: p.header() for k, p in packed.items()})}
    dense_linear = sum(state[k].numel() * state[k].element_size() for k in keys)
    dense_all = sum(t.numel() * t.element_size() for t in state.values())
    zeros = sum(int((state[k] == 0).sum()) for k in keys)
    n_linear = sum(state[k].numel() for k in keys)
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": cfg.layout, "dtype": dtype_name(dtype),
        "weights_file": PACK_WEIGHTS_FILE, "source": lm.source, "config": cfg.to_dict(),
        "packed_tensors": len(packed),
        "decoder_linear": {"parameters": n_linear, "zeros": zeros, "sparsity": zeros / n_linear},
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / PACK_WEIGHTS_FILE), metadata=header)
        manifest["checksums"] = tensor_checksums(tmp / PACK_WEIGHTS_FILE)  # verified on every read
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype_name(dtype)  # what the file holds, not what the source was loaded as
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        for name in EXTRA_FILES:
            if (lm.path / name).is_file():
                shutil.copyfile(lm.path / name, tmp / name)
        make_portable(tmp)  # with our own modeling_surgeon.py beside a per-layer config
        back = read_compressed(tmp, check_manifest=False)
        for key, p in packed.items():
            got, want = back.packed[key].dense(), state[key]
            if not bool(((got == want) | (got.isnan() & want.isnan())).all()):
                raise RuntimeError(f"{key}: the written {cfg.layout} weight does not read back equal")
        packed_linear = sum(p.nbytes for p in packed.values())
        file_bytes = (tmp / PACK_WEIGHTS_FILE).stat().st_size
        manifest["bytes"] = {
            "file": file_bytes, "dense_tensors": dense_all, "file_vs_dense": file_bytes / dense_all,
            "decoder_linear_packed": packed_linear, "decoder_linear_dense": dense_linear,
            "decoder_linear_ratio": packed_linear / dense_linear,
        }
        (tmp / PACK_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        write_card(tmp, title=f"Compressed checkpoint ({FORMAT} v{FORMAT_VERSION}, {cfg.layout}, {manifest['dtype']})",
                   source=lm.source, report=_source_report(lm.path), source_dir=lm.path, library="surgeon-export",
                   tags=["sparse", cfg.layout], usage=[_readme(manifest)],
                   notes=[f"decoder linears stored as {cfg.layout}: {manifest['bytes']['decoder_linear_ratio']:.4f}x "
                          "their dense bytes (measured in the written file)"])

    with torch.no_grad(), quiet_transformers():
        write_atomically(out, force, fill)
    return manifest


def _source_report(directory: Path) -> dict:
    """The source's ``surgeon_report.json`` (what was pruned and measured), or {}."""
    try:
        return json.loads((directory / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _readme(manifest: dict) -> str:
    layout = manifest["layout"]
    return (
        f"Written by `surgeon-export pack` from {manifest['source']}. The decoder linears are stored as "
        f"{layout} parts in `{PACK_WEIGHTS_FILE}` (layout: export/semi_structured.py and export/sparse_csr.py of "
        "surgeon-export); every other tensor is dense. There is no `model.safetensors`: plain transformers "
        "cannot load this directory directly.\n\n"
        "- run it: `surgeon-export bench DIR --backend torch-24` (N:M) or `--backend torch-csr` (CSR/BSR), "
        "or `runtime.load.load_compressed(DIR)`;\n"
        "- make a normal checkpoint: `surgeon-export densify DIR --out DENSE_DIR`.\n"
    )


def _read_manifest(directory: Path) -> dict:
    path = directory / PACK_MANIFEST_FILE
    if not path.is_file():
        raise SurgeonError(f"{directory} is not a compressed checkpoint ({PACK_MANIFEST_FILE} missing; write one "
                           "with `surgeon-export pack`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SurgeonError(f"{path}: not a {FORMAT} manifest")
    return manifest


def _check_version(version: object, where: str) -> None:
    if version != FORMAT_VERSION:
        raise SurgeonError(f"{where}: {FORMAT} format version {version!r}; this surgeon-export reads version "
                           f"{FORMAT_VERSION}" + (" (upgrade surgeon-export)" if isinstance(version, int)
                                                  and version > FORMAT_VERSION else ""))


def _entry(key: str, raw: object) -> tuple[str, tuple[int, int], torch.dtype, tuple[int, int] | None]:
    """Layout, shape, dtype and block size of one ``packed`` metadata entry, checked."""
    if not isinstance(raw, dict):
        raise SurgeonError(f"{key}: packed metadata entry is not an object")
    layout, shape, dtype, block = raw.get("layout"), raw.get("shape"), raw.get("dtype"), raw.get("blocksize")
    if not is_layout(layout):
        raise SurgeonError(f"{key}: unknown layout {layout!r} in the metadata")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise SurgeonError(f"{key}: metadata shape {shape!r} is not [rows, cols]")
    if dtype not in DTYPES:
        raise SurgeonError(f"{key}: metadata dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    blocksize = None
    if layout == "bsr":
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
            raise SurgeonError(f"{key}: BSR metadata needs a blocksize [rows, cols], got {block!r}")
        blocksize = (block[0], block[1])
    return layout, (shape[0], shape[1]), DTYPES[dtype], blocksize


def build_skeleton(directory: Path) -> nn.Module:
    """The model ``config.json`` describes, on the meta device (no code from the directory runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except config_errors() as exc:  # a config transformers cannot build a model from (tests/test_fuzz.py)
            raise SurgeonError(f"{directory / 'config.json'}: {error_reason(exc)}") from None


def read_compressed(directory: Path, *, check_manifest: bool = True) -> CompressedCheckpoint:
    """Read and check a compressed directory (see the module docstring); tensors stay on CPU.

    Raises:
        SurgeonError: naming the file or tensor at fault (wrong version, tampered header, metadata
            that does not match the values, a shape config.json does not describe, missing tensors).
    """
    directory = Path(directory).expanduser()
    manifest = _read_manifest(directory) if check_manifest else {"format": FORMAT, "format_version": FORMAT_VERSION}
    _check_version(manifest.get("format_version"), str(directory / PACK_MANIFEST_FILE))
    config = read_config(directory)
    path = directory / PACK_WEIGHTS_FILE
    if not path.is_file():
        raise SurgeonError(f"{directory}: {PACK_WEIGHTS_FILE} is missing")
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SurgeonError(f"{path}: header metadata does not say format {FORMAT!r}")
        version = meta.get("format_version")
        _check_version(int(version) if isinstance(version, str) and version.isdigit() else version, str(path))
        file_layout = meta.get("layout")
        if not is_layout(file_layout) or file_layout != manifest.get("layout", file_layout):
            raise SurgeonError(f"{path}: header layout {file_layout!r} does not match the manifest's "
                               f"{manifest.get('layout')!r}")
        try:
            entries = json.loads(meta.get("packed", ""))
        except json.JSONDecodeError as exc:
            raise SurgeonError(f"{path}: header metadata 'packed' is not valid JSON ({exc})") from None
        if not isinstance(entries, dict):
            raise SurgeonError(f"{path}: header metadata 'packed' is not a JSON object")
        stored = {key: f.get_tensor(key) for key in f.keys()}
    packed = {}
    for key, raw in entries.items():
        layout, shape, dtype, block = _entry(key, raw)
        if layout != file_layout:
            raise SurgeonError(f"{key}: layout {layout} in a {file_layout} file")
        names = {part: f"{key}.{part}" for part in layout_parts(layout)}
        missing = [n for n in names.values() if n not in stored]
        if missing:
            raise SurgeonError(f"{key}: packed part {missing[0]} is missing from {path.name}")
        if key in stored:
            raise SurgeonError(f"{key}: stored both dense and packed in {path.name}")
        packed[key] = PackedTensor(key, layout, shape, dtype, {p: stored.pop(n) for p, n in names.items()}, block)
    skeleton = build_skeleton(directory)
    check_shapes(directory, skeleton, {**{k: tuple(v.shape) for k, v in stored.items()},
                                       **{k: p.shape for k, p in packed.items()}})
    if check_manifest:  # after the structure checks, so a malformed file gets its own message
        _verify(path, manifest)
    return CompressedCheckpoint(directory, config, manifest, stored, packed, skeleton)


def _verify(path: Path, manifest: dict) -> None:
    """Every stored tensor against the manifest's checksum; packs from before checksums load with a warning."""
    if "checksums" not in manifest:
        log.warning("%s has no checksums (written by an older surgeon-export): its values cannot be verified; "
                    "pack it again to add them", path.parent / PACK_MANIFEST_FILE)
        return
    verify_checksums(path, manifest["checksums"], PACK_MANIFEST_FILE)


def densify(directory: Path, out: Path, *, force: bool = False) -> dict:
    """Write the compressed directory as a normal dense checkpoint (``model.safetensors``); returns a summary.

    The result loads with plain ``AutoModelForCausalLM.from_pretrained`` (stock model types) and
    gives the same tensors as the packed weights decompress to.

    Example:
        >>> densify(Path("m24-packed"), Path("m24-dense"))  # doctest: +SKIP
    """
    ckpt = read_compressed(directory)
    state = {**ckpt.dense, **{k: p.dense() for k, p in ckpt.packed.items()}}

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for item in directory.iterdir():
            if item.is_file() and item.name not in NOT_COPIED:
                shutil.copyfile(item, tmp / item.name)
        make_portable(tmp)  # with our own modeling_surgeon.py beside a per-layer config
        write_card(tmp, title=f"{Path(out).name}: a dense checkpoint unpacked from a {ckpt.manifest.get('layout')} pack",
                   source=str(directory), report=_source_report(directory), source_dir=directory,
                   tags=["sparse"], usage=["A plain safetensors checkpoint with the values the pack held "
                                           "(zeros where the pattern removed weights)."])

    write_atomically(out, force, fill)
    return {"source": str(directory), "out": str(out), "layout": ckpt.manifest.get("layout"),
            "tensors": len(state), "bytes_on_disk": (Path(out).expanduser() / "model.safetensors").stat().st_size}
