"""Writing files safely: one atomic writer for a file, one for a directory, one name for their temporaries.

Every writer of ours (checkpoints, packs, ONNX exports, the model cache, benchmark results, model
cards, the pieces of resumable state) goes through :func:`write_file` or :func:`write_dir`; the GGUF
writer (which streams into a path of its own) and streamed pruning's resumable directory use their
parts, :func:`temp_path` and :func:`install_dir`:

- the output is built under a hidden temporary sibling of the target, ``.NAME.tmp-PID-XXXXXXXX``
  (:func:`temp_path`), and renamed into place: a reader sees the old output or the new one, never a part;
- an existing directory is replaced safely (:func:`install_dir`): moved aside to
  ``.NAME.old-PID-XXXXXXXX``, the new one renamed in, then the old one removed (put back if the rename
  fails);
- before writing, :func:`clean_stale` removes what a killed run left beside the same target (a kill
  runs no cleanup): temporaries whose process is gone, and an old copy moved aside (put back where the
  target is missing, removed where it is there);
- a failed write (disk full, read-only file system, a safetensors I/O error) is one line
  (:func:`write_error`) naming the target and the reason, with no temporary left.

:func:`check_writable` refuses a target whose parent cannot be written *before* minutes of pruning or
export, not with an ``OSError`` traceback after them (a probe file is created and removed, because
``os.access`` says yes to root on a read-only mount). :func:`read_json` reads a JSON file of ours or
the user's with a one-line error for a file that is not JSON.

Resumable runs (streamed pruning) keep their finished work in a hidden directory on purpose
(:mod:`base.resume`); they run inside :func:`resumable`, so that Ctrl-C's message
(:func:`interrupted_message`) says what stays, where, and how to resume or remove it, instead of
"nothing was written".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from base.errors import SurgeonError

log = logging.getLogger(__name__)

PROCESS_START = time.time()  # temporaries of other processes older than this may be stale


def _restart_clock() -> None:
    global PROCESS_START
    PROCESS_START = time.time()


os.register_at_fork(after_in_child=_restart_clock)  # a forked child is a new process: its own start
# ``tmp``: a temporary being written; ``old``: an output moved aside while its replacement is renamed in.
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class WriteError(SurgeonError):
    """A write that failed (disk full, read-only, an I/O error): one line naming the target."""


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def temp_path(target: Path) -> Path:
    """A fresh name for a temporary sibling of ``target`` (not created): hidden, with this process's id,
    so that :func:`clean_stale` can tell ours from anything else and whose process is gone.

    Example:
        >>> temp_path(Path("out/model.gguf")).name.startswith(f".model.gguf.tmp-{os.getpid()}-")
        True
    """
    return _sibling(Path(target), "tmp")


def existing_ancestor(path: Path) -> Path:
    """``path`` (absolute) or its nearest ancestor that exists: where an output not yet made would go."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(target: Path, what: str = "output") -> None:
    """Refuse ``target`` when it could not be written: its nearest existing ancestor is not a
    writable directory. Creates nothing that stays (a probe file is made and removed)."""
    target = Path(target).expanduser().absolute()
    parent = existing_ancestor(target.parent)
    if not parent.is_dir():
        raise SurgeonError(f"cannot write {what} {target}: {parent} is not a directory")
    probe = temp_path(parent / "probe")
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise SurgeonError(f"cannot write {what} {target}: {parent}: {exc.strerror or exc}") from None
    probe.unlink()


def check_free_disk(target: Path, need: int, what: str, *, resuming: bool = False) -> None:
    """Refuse, before any work, a run whose files beside ``target`` need more than the free space of its
    file system (``need`` bytes at the run's peak, ``what`` they are); where the run resumes, its files
    already there are part of ``need``, so it warns instead. Logs the figure either way."""
    where = existing_ancestor(target)
    free = shutil.disk_usage(where).free
    log.info("%s: about %.1f GiB of disk at the peak (%.1f GiB free in %s)", what, need / 2**30, free / 2**30, where)
    if need <= free:
        return
    message = f"{what}: about {need / 2**30:.1f} GiB of disk at the peak, and {where} has {free / 2**30:.1f} GiB free"
    if not resuming:
        raise SurgeonError(f"{message}: free space there or write --out on a larger disk (docs/streaming.md, "
                           "\"Scratch disk\")")
    log.warning("%s; this run resumes, so part of it is written already: it may stop on a full disk (it resumes "
                "once there is room)", message)


_RESUMABLE: list[tuple[Path, Path]] = []  # the resumable directory of the run in progress, and its output


@contextmanager
def resumable(directory: Path, target: Path) -> Iterator[None]:
    """Within the block, ``directory`` holds resumable work for ``target``: a Ctrl-C (KeyboardInterrupt)
    leaves it registered for :func:`interrupted_message`; any other way out forgets it."""
    _RESUMABLE[:] = [(Path(directory).absolute(), Path(target))]  # one run at a time
    try:
        yield
    except KeyboardInterrupt:
        raise  # stays registered: the interrupted message names it
    except BaseException:
        _RESUMABLE.clear()
        raise
    _RESUMABLE.clear()


def _size(directory: Path) -> str:
    """The bytes of every file under ``directory``, in MB (kB below one MB)."""
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def interrupted_message() -> str:
    """The line Ctrl-C prints: nothing written, or exactly which resumable directory stays and how to go on.

    Example:
        >>> interrupted_message()  # no resumable run in this process
        'interrupted; nothing was written'
    """
    kept = [(d, t) for d, t in _RESUMABLE if d.is_dir()]
    _RESUMABLE.clear()  # said once
    if not kept:
        return "interrupted; nothing was written"
    (directory, target), = kept
    return (f"interrupted; nothing was written to {target}, but {directory} ({_size(directory)}, the work finished "
            f"so far) is kept to resume: run the same command again to go on from there, or remove it "
            f"(rm -r {directory}) to free the space")


def write_file(path: Path, content: str | bytes | Callable[[Path], object], *, target: Path | None = None) -> None:
    """Write the file ``path`` atomically: into a temporary sibling (:func:`temp_path`), renamed into place.

    Args:
        content: text (UTF-8), bytes, or a function that writes the file at the path it is given
            (``lambda p: save_file(tensors, str(p))``); the path does not exist yet.
        target: what a failed write's one line names (default ``path``).

    Stale temporaries of ``path`` are removed first; a failed write leaves no temporary and the old
    file as it was, and is one :class:`WriteError` line.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> write_file(d / "a.json", '{"x": 1}'); (d / "a.json").read_text()
        '{"x": 1}'
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent, path.name)
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if is_write_error(exc):
            raise write_error(exc, target or path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)




def write_dir(target: Path, fill: Callable[[Path], object], *, replace: bool = True) -> None:
    """Write the directory ``target`` atomically: ``fill`` writes into a fresh temporary sibling, which
    is renamed into place.

    Args:
        fill: writes the directory's files into the (existing, empty) directory it is given.
        replace: an existing ``target`` is replaced (:func:`install_dir`); False: it is kept and ours
            dropped (another process wrote the same thing first, e.g. the model cache).

    A failed write is one :class:`WriteError` line; no temporary stays, and a replaced directory
    comes back.
    """
    target = Path(target)
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent, target.name)
        tmp.mkdir()
        fill(tmp)
        if replace:
            install_dir(tmp, target)
        else:
            try:
                os.replace(tmp, target)
            except OSError:  # there already: another process finished first; its copy is as good as ours
                if not target.is_dir():
                    raise
    except Exception as exc:
        if is_write_error(exc):
            raise write_error(exc, target) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_dir(built: Path, target: Path) -> None:
    """Rename the finished directory ``built`` to ``target``, replacing an existing ``target`` safely.

    The old ``target`` is moved aside (``.NAME.old-PID-XXXXXXXX``) and removed only once the new one is
    in place; if that rename fails, it comes back. A kill between the two renames leaves it aside, and
    the next :func:`clean_stale` of ``target`` puts it back.
    """
    old = _sibling(target, "old") if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(built, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_error(exc: BaseException, target: Path) -> WriteError:
    """One line for a failed write (``OSError`` or safetensors' I/O error) of ``target``."""
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "StorageFull" in text:
        reason = "no space left on device"
    return WriteError(f"cannot write {target}: {reason}; nothing was written")


def is_write_error(exc: BaseException) -> bool:
    """An ``OSError`` or a safetensors error from reading or writing a file (not a bug elsewhere)."""
    from safetensors import SafetensorError

    return isinstance(exc, (OSError, SafetensorError))


def read_json(path: Path) -> Any:
    """The content of the JSON file ``path``; a file that is not valid JSON (or not UTF-8) is one line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"{path}: not valid JSON ({exc})") from None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Clear up what killed runs left in ``directory`` beside target ``name`` (or any): only entries
    whose process is gone and that are older than this process.

    A temporary (``.NAME.tmp-PID-XXXX``) is removed. An old output moved aside (``.NAME.old-PID-XXXX``,
    :func:`install_dir`) is put back where ``NAME`` is missing, else removed. Returns the entries handled.
    """
    directory = Path(directory)
    handled: list[Path] = []
    if not directory.is_dir():
        return handled
    for entry in directory.iterdir():
        match = _OURS.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        try:
            if entry.lstat().st_mtime >= PROCESS_START:
                continue
            original = directory / match["name"]
            if match["kind"] == "old" and not os.path.lexists(original):
                os.replace(entry, original)
                log.warning("put back %s, moved aside by an interrupted run that was replacing it", original)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        log.info("cleared a stale temporary of an interrupted run: %s", entry)
        handled.append(entry)
    return handled
