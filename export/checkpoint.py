"""Write a pruned model as a Hugging Face checkpoint directory, atomically.

The directory holds ``config.json``, safetensors weights, the tokenizer files and
``surgeon_report.json`` (what was pruned, how, and the zeros counted in the saved tensors). It is
built in a temporary sibling directory and renamed into place (:func:`base.files.write_dir`), so an
interrupted write never leaves a half-written checkpoint at the target path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from base.errors import SurgeonError
from base.files import check_writable, write_dir
from base.formats import REPORT_FILE
from base.loading import quiet_transformers
from export.card import write_card
from export.portable import make_portable

REPORT_VERSION = 1


def prepare_target(out: Path, force: bool, source: str | Path | None = None) -> None:
    """Check an output directory before any work: refuse to overwrite a non-empty directory (or a
    file) unless ``force``, never replace the working directory, one of its parents, the home
    directory or a directory holding ``source`` (even with ``force``), and refuse a target whose
    parent cannot be written (:func:`base.files.check_writable`)."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    precious = {cwd, *cwd.parents}
    try:
        precious.add(Path.home().resolve())
    except (KeyError, RuntimeError):  # no home directory known
        pass
    if resolved in precious:
        raise SurgeonError(f"refusing to write over {out} ({resolved}): it is the working directory, "
                           "one of its parents or the home directory; give a new directory")
    if source is not None and str(source) != "default":
        src = Path(source).expanduser().resolve()
        if resolved == src or resolved in src.parents:
            raise SurgeonError(f"refusing to write over {out}: it holds the input model {source}")
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SurgeonError(f"output directory is not empty: {out} (use --force to replace it)")
    check_writable(out)


def count_saved_zeros(directory: Path, names: list[str]) -> dict[str, int]:
    """Zeros of the named weight tensors as stored in the directory's safetensors files."""
    zeros: dict[str, int] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                base = key.removesuffix(".weight")
                if base in names:
                    zeros[base] = int((f.get_tensor(key) == 0).sum())
    return zeros


def saved_accounting(directory: Path, linear_names: list[str], numel: int) -> dict:
    """Zeros, sparsity and bytes as written in ``directory``; every named linear must be there."""
    zeros = count_saved_zeros(directory, linear_names)
    missing = set(linear_names) - set(zeros)
    if missing:
        raise RuntimeError(f"saved checkpoint lacks {sorted(missing)[0]}")
    return {
        "saved_decoder_linear_params": numel,
        "saved_zeros": sum(zeros.values()),
        "saved_sparsity": sum(zeros.values()) / numel,
        "bytes_on_disk": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
    }


def write_atomically(out: Path, force: bool, fill: Callable[[Path], object]) -> None:
    """Create the output directory ``out``: checked first (:func:`prepare_target`), then built by ``fill``
    in a temporary sibling and renamed into place (:func:`base.files.write_dir`)."""
    out = Path(out).expanduser()
    prepare_target(out, force)
    write_dir(out, fill)


def save_checkpoint(
    model: nn.Module, tokenizer: object, out: Path, report: dict, linear_names: list[str], *, force: bool = False,
    source_dir: Path | None = None,
) -> dict:
    """Save ``model`` and ``tokenizer`` to ``out`` with a report; returns the report as written.

    The report's ``saved_zeros`` and ``saved_sparsity`` are counted in the written tensors, not
    taken from the pruner's word.
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        numel = sum(model.get_submodule(n).weight.numel() for n in linear_names)
        report.update(format_version=REPORT_VERSION, **saved_accounting(tmp, linear_names, numel))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        make_portable(tmp)
        write_card(tmp, title=f"{Path(out).name}: a pruned model (same shapes, zeros in the weights)",
                   source=report.get("model"), report=report, source_dir=source_dir, usage=[
                       "Same architecture and shapes as the source; the pruned weights are zeros. "
                       "`surgeon-export pack DIR --format 2:4|csr|bsr` stores them compressed."])

    with torch.no_grad(), quiet_transformers():
        write_atomically(out, force, fill)
    return report
