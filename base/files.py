"""Writing files safely: check the target before the work, name our temporaries, clean stale ones.

Every writer (checkpoints, ONNX, packs, the model cache, benchmark results, resumable state) builds
its output under a hidden temporary name beside the target and renames it into place. Three things
are shared here so that they are done once:

- :func:`check_writable`: refuse a target whose parent cannot be written *before* minutes of
  pruning or export, not with an ``OSError`` traceback after them (a probe file is created and
  removed, because ``os.access`` says yes to root on a read-only mount);
- :func:`temp_prefix` and :func:`clean_stale`: temporaries are named ``.NAME.tmp-PID-XXXXXXXX``,
  so a later run can tell ours from anything else, and remove those whose process is gone (a kill
  during a write cannot run any cleanup);
- :func:`write_error`: a failed write (disk full, read-only file system, a safetensors I/O error)
  becomes one :class:`SurgeonError` line naming the target and the reason.

Resumable runs (streamed pruning) keep their finished work in a hidden directory on purpose; they
run inside :func:`resumable`, so that Ctrl-C's message (:func:`interrupted_message`) says
what stays, where, and how to resume or remove it, instead of "nothing was written".
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from base.errors import SurgeonError

log = logging.getLogger(__name__)

PROCESS_START = time.time()  # temporaries of other processes older than this may be stale


def _restart_clock() -> None:
    global PROCESS_START
    PROCESS_START = time.time()


os.register_at_fork(after_in_child=_restart_clock)  # a forked child is a new process: its own start
_STALE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
LEGACY_MKSTEMP = re.compile(r"^tmp[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(suffix=".tmp"), before pids were recorded
LEGACY_AGE = 3600.0  # seconds: a temporary without a pid untouched this long is no one's


def temp_prefix(name: str) -> str:
    """The prefix of our temporary sibling for target ``name``: hidden, with this process's id."""
    return f".{name}.tmp-{os.getpid()}-"


def check_writable(target: Path, what: str = "output") -> None:
    """Refuse ``target`` when it could not be written: its nearest existing ancestor is not a
    writable directory. Creates nothing that stays (a probe file is made and removed)."""
    target = Path(target).expanduser().absolute()
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SurgeonError(f"cannot write {what} {target}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("probe"), dir=parent)
    except OSError as exc:
        raise SurgeonError(f"cannot write {what} {target}: {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (:func:`temp_prefix`) renamed into place:
    readers see the old file or the new one, never a part; a failed write is one line."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(exc, path) from None


def write_error(exc: BaseException, target: Path) -> SurgeonError:
    """One line for a failed write (``OSError`` or safetensors' I/O error) of ``target``."""
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "StorageFull" in text:
        reason = "no space left on device"
    return SurgeonError(f"cannot write {target}: {reason}; nothing was written")


def is_write_error(exc: BaseException) -> bool:
    """An ``OSError`` or a safetensors error from reading or writing a file (not a bug elsewhere)."""
    from safetensors import SafetensorError

    return isinstance(exc, (OSError, SafetensorError))


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


def clean_stale(directory: Path, name: str | None = None, legacy: re.Pattern[str] | None = None) -> list[Path]:
    """Remove our stale temporaries in ``directory`` (``.NAME.tmp-PID-XXXX``, for target ``name`` or
    any): only those whose process is gone and that are older than this process. ``legacy``: also
    names without a pid, when older than this process and untouched for :data:`LEGACY_AGE`."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _STALE.match(entry.name)
        old = legacy is not None and legacy.match(entry.name) is not None
        if not old and (match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"]))):
            continue
        try:
            mtime = entry.lstat().st_mtime
            if mtime >= PROCESS_START or (old and time.time() - mtime < LEGACY_AGE):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        log.info("removed a stale temporary from an interrupted run: %s", entry)
        removed.append(entry)
    return removed
