"""Resumable state: the one place that says whether saved work belongs to this run and is intact.

A resumable stage keeps its finished work in a directory: LLM Surgeon's ``--checkpoint``
(:mod:`surgeon.llm_surgeon`), recovery's checkpoint (:mod:`surgeon.recover`), streamed pruning's
partial checkpoint (:mod:`export.streaming`) and streamed LLM Surgeon's spill directory
(:mod:`surgeon.streamed_surgeon`). The work is in *pieces* (safetensors or JSON files), each written
atomically (:func:`base.files.write_file`), and in one JSON *state file* written after them::

    {"version": V, "binding": {...}, "pieces": {"NAME": "sha256 of the file", ...}, ...the stage's own fields}

- ``version``: the stage's format; a state of another version is refused.
- ``binding``: what the run is for: the source model's identity, the settings, a digest of the
  calibration windows. A rerun with another binding is refused, naming what differs (the entries
  of :data:`MODEL_KEYS` as "another model").
- ``pieces``: the finished pieces and their checksums; a missing or changed piece is refused.

:meth:`ResumeState.open` checks all three, and a refusal is one line saying why. A kill at any moment
leaves a state file and the pieces it names, whole: a piece is written before the state that names
it, and a piece the state stops naming (:meth:`ResumeState.forget`) is removed only after the state
is saved. A file matching the stage's piece pattern that the state does not name (a kill between a
piece and its state) is removed when the state is opened or saved, and so are stale temporaries.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from base.errors import SurgeonError
from base.files import clean_stale, write_file
from base.integrity import file_digest

log = logging.getLogger(__name__)

MODEL_KEYS = ("source model", "linears")  # binding entries that identify the model; the others are settings
_RESERVED = ("version", "binding", "pieces")  # the state file's own fields; the stage's go beside them


def differences(old: dict, new: dict) -> list[str]:
    """Names of the binding entries that differ; within an entry that is a dict on both sides, of its
    entries.

    Example:
        >>> differences({"config": {"shots": 2, "lam": 1}, "seed": 0}, {"config": {"shots": 3, "lam": 1}, "seed": 1})
        ['config.shots', 'seed']
    """
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            names.append(key)
    return names


class ResumeState:
    """The saved state of one resumable stage in ``directory`` (module docstring).

    Args:
        directory: where the state file and the pieces are.
        file: the state file's name (``progress.json``, ...).
        version: the stage's format version.
        binding: what this run is for (JSON-serialisable).
        pieces: a glob of the stage's piece names: files matching it that the state does not name are
            leftovers of an interrupted step and are removed.
        target: what a failed write's one line names (default ``directory``).

    Example:
        >>> state = ResumeState.open(Path("ckpt"), "progress.json", 1, {"seed": 0})  # doctest: +SKIP
        >>> state.put_tensors("state-1.safetensors", tensors); state.save(step=1)  # doctest: +SKIP
    """

    def __init__(self, directory: Path, file: str, version: int, binding: dict, *, pieces: str = "*",
                 target: Path | None = None) -> None:
        self.directory = Path(directory)
        self.file = file
        self.version = version
        self.binding = json.loads(json.dumps(binding))  # as it reads back (tuples as lists, keys as strings)
        self.pattern = pieces
        self.target = Path(target) if target is not None else self.directory
        self.pieces: dict[str, str] = {}  # name -> sha256 of the file
        self.data: dict[str, Any] = {}  # the stage's own fields
        self.resumed = False

    @classmethod
    def open(cls, directory: Path, file: str, version: int, binding: dict, *, pieces: str = "*",
             target: Path | None = None) -> ResumeState:
        """The saved state in ``directory`` when there is one and it is this run's, its pieces intact
        (``resumed`` True); a fresh one (nothing written yet) when there is none. A saved state of
        another version or binding, or with a missing or changed piece, is one SurgeonError line."""
        state = cls(directory, file, version, binding, pieces=pieces, target=target)
        if (state.directory / file).is_file():
            state._load()
        state._remove_unnamed()
        return state

    def _refuse(self, reason: str) -> SurgeonError:
        return SurgeonError(f"cannot resume from {self.directory}: {reason}")

    def _load(self) -> None:
        try:
            saved = json.loads((self.directory / self.file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._refuse(f"{self.file} is unreadable ({exc}); remove it to start over") from None
        if not (isinstance(saved, dict) and saved.get("version") == self.version
                and isinstance(saved.get("binding"), dict) and isinstance(saved.get("pieces"), dict)
                and all(isinstance(n, str) and Path(n).name == n and fnmatch.fnmatch(n, self.pattern)
                        and isinstance(d, str) for n, d in saved["pieces"].items())):
            raise self._refuse(f"{self.file} was written by another surgeon-export version; remove it to start over")
        changed = differences(saved["binding"], self.binding)
        if changed:
            model = [c for c in changed if c.split(".")[0] in MODEL_KEYS]
            others = [c for c in changed if c not in model]
            what = " and ".join(x for x in ("another model" if model else "",
                                             f"other settings ({', '.join(others)})" if others else "") if x)
            raise self._refuse(f"it was made with {what}; rerun with the same model and options, or remove it "
                               "to start over")
        for name, digest in saved["pieces"].items():
            if not (self.directory / name).is_file():
                raise self._refuse(f"{name}, listed in {self.file}, is missing; remove it to start over")
            if file_digest(self.directory / name) != digest:
                raise self._refuse(f"{name} does not match its checksum in {self.file} (the file was changed or "
                                   "damaged); remove it to start over")
        self.pieces = dict(saved["pieces"])
        self.data = {k: v for k, v in saved.items() if k not in _RESERVED}
        self.resumed = True
        log.info("resuming from %s", self.directory)

    def _remove_unnamed(self) -> None:
        """Remove stale temporaries, and the files matching the piece pattern that the state does not name."""
        if not self.directory.is_dir():
            return
        clean_stale(self.directory)
        for f in self.directory.iterdir():
            if (f.is_file() and not f.name.startswith(".") and f.name != self.file and f.name not in self.pieces
                    and fnmatch.fnmatch(f.name, self.pattern)):
                f.unlink(missing_ok=True)

    def _write(self, name: str, content: str | bytes | Callable[[Path], object]) -> None:
        """Every file of the state goes through here (atomically; a failed write is one line naming the target)."""
        write_file(self.directory / name, content, target=self.target)

    # -- pieces --
    def put(self, name: str, content: str | bytes | Callable[[Path], object]) -> None:
        """Write the piece ``name`` (text, bytes, or a function writing the path it is given) and record
        its checksum; the state file names it from the next :meth:`save` on."""
        self._write(name, content)
        self.pieces[name] = file_digest(self.directory / name)

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` as the safetensors piece ``name``."""
        data = {k: v.detach().contiguous() for k, v in tensors.items()}
        self.put(name, lambda path: save_file(data, str(path)))

    def put_json(self, name: str, value: Any) -> None:
        self.put(name, json.dumps(value))

    def tensors(self, name: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors (all, or ``keys``) of the safetensors piece ``name``."""
        with safe_open(str(self.directory / name), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}

    def load_json(self, name: str) -> Any:
        return json.loads((self.directory / name).read_text())

    def forget(self, *patterns: str) -> None:
        """Stop naming the pieces matching ``patterns``; their files are removed after the next :meth:`save`."""
        for name in [n for n in self.pieces if any(fnmatch.fnmatch(n, p) for p in patterns)]:
            del self.pieces[name]

    # -- the state file --
    def save(self, **fields: Any) -> None:
        """Update the stage's fields and write the state file, naming the pieces written so far; then
        remove the pieces it no longer names."""
        if set(fields) & set(_RESERVED):
            raise ValueError(f"{sorted(set(fields) & set(_RESERVED))} are the state file's own fields")
        self.data.update(fields)
        self._write(self.file, json.dumps({"version": self.version, "binding": self.binding, "pieces": self.pieces,
                                           **self.data}, indent=1))
        self._remove_unnamed()
