"""Data-parallel pruning over ``torch.distributed``: ranks, window shards, reductions, owners, broadcasts.

Launched with ``torchrun --nproc-per-node N [--nnodes M ...] -m surgeon_export prune ...`` (or any
script that calls the Python API under torchrun), every rank runs the same pruning code on its own
contiguous share of the calibration windows (:func:`split_windows`). The statistics each method
needs are summed over the ranks (:func:`all_reduce_sum`), the per-linear work is split by estimated
cost (:func:`assign`) and its results are sent from the rank that computed them to every other
(:func:`broadcast_from`), so every rank ends with the same model; rank 0 alone writes outputs.

With one process (no ``WORLD_SIZE`` above 1 in the environment and no process group) every
function here is a no-op: the rank is 0, the world size 1, a shard is all windows, every item is
owned by rank 0, reductions and broadcasts change nothing. The single-process code path *is* the
distributed one.

Backends: gloo for CPU tensors, NCCL for CUDA tensors when CUDA is available (one process group
``cpu:gloo,cuda:nccl``; each collective goes to the backend of its tensors' device). Every
collective runs under the timeout given to :func:`init_from_env`: a rank that stops (killed,
crashed, stuck) makes the others fail with one line (:class:`DistributedError`) instead of hanging.
Under torchrun, the launcher sends SIGTERM to the surviving ranks as soon as one dies; each then
stops with the same kind of line, naming the rank that died (every rank's host and process id are
exchanged when the group is joined, so a dead rank on the same node is found by its pid), and exit
code 2. torchrun itself then prints its own summary (a ``ChildFailedError`` traceback, in the
launcher's process, which our code cannot reach; docs/distributed.md).
Time spent inside collectives (including waiting for slower ranks) is counted per process
(:func:`collective_stats`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from base.errors import SurgeonError, first_line

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the slowest rank (prune --dist-timeout)
_STATS = {"seconds": 0.0, "calls": 0, "bytes": 0}
_TIMEOUT = [DEFAULT_TIMEOUT]
_PEERS: list[tuple[int, int]] = []  # (host digest, pid) of every rank, rank by rank, once the group is joined
_REPORTED = [False]  # a DistributedError was raised: a later SIGTERM just ends the process
T = TypeVar("T")


class DistributedError(SurgeonError):
    """Another rank stopped or a collective timed out: one line, on every surviving rank."""


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset): whether this process was launched as one of many."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SurgeonError(f"WORLD_SIZE must be a number, got {os.environ['WORLD_SIZE']!r}") from None


def init_from_env(timeout: float | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``).

    Does nothing with one process or when a group already exists (returns whether one is active).
    CUDA, when available, gets NCCL for its tensors and the device ``LOCAL_RANK``; CPU tensors go
    through gloo.

    Args:
        timeout: seconds any collective (and the start-up rendezvous) may wait; default
            :data:`DEFAULT_TIMEOUT`.
    """
    import torch.distributed as dist

    if timeout is not None:
        if not timeout > 0:
            raise SurgeonError(f"--dist-timeout must be a positive number of seconds, got {timeout}")
        _TIMEOUT[0] = float(timeout)
    if active():
        return True
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise SurgeonError("WORLD_SIZE is above 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=_TIMEOUT[0]))
    except ValueError as exc:  # a missing MASTER_ADDR / RANK: launched by hand, not by torchrun
        raise SurgeonError(f"cannot join the process group: {exc}") from None
    except RuntimeError as exc:  # the rendezvous timed out or was refused
        raise DistributedError(f"cannot join the process group of {env_world_size()} ranks "
                               f"({first_line(exc)})") from None
    _REPORTED[0] = False
    _PEERS[:] = [(int(h), int(p)) for h, p in gather_rows([_host_digest(), os.getpid()])]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    log.info("rank %d of %d (%s), collectives time out after %.0f s", rank(), world_size(), backend, _TIMEOUT[0])
    return True


def _host_digest() -> int:
    """This host's name as a number a float64 holds exactly (48 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:6], "big")


def _process_gone(pid: int) -> bool:
    """The process ``pid`` (on this host) has ended: it no longer exists, or is a zombie not yet reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # "pid (name) S ..."
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return state in ("Z", "X")


def dead_ranks() -> list[int]:
    """The other ranks on this host whose process has ended (ranks on other hosts cannot be checked)."""
    me, host = rank(), _host_digest()
    return [r for r, (h, pid) in enumerate(_PEERS) if r != me and h == host and _process_gone(pid)]


def _who_stopped() -> str | None:
    """"rank 1 of 4 stopped" when dead ranks are found on this host, else None."""
    dead, n = dead_ranks(), world_size()
    if not dead:
        return None
    return f"rank{'s' * (len(dead) > 1)} {', '.join(map(str, dead))} of {n} stopped"


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM, which torchrun sends the surviving ranks when one fails: our one line, then exit code 2."""
    if _REPORTED[0]:  # this rank already said why it stops (a failed collective): just end
        raise SystemExit(2)
    _REPORTED[0] = True
    who = _who_stopped()
    reason = f"{who}, and the launcher stopped this rank" if who else "stopped by SIGTERM (torchrun sends it " \
        "when another rank fails)"
    raise DistributedError(f"rank {rank()} of {world_size()}: {reason}; nothing was written")


def active() -> bool:
    """A process group with more than one rank exists."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one that writes outputs and prints results."""
    return rank() == 0


def shutdown() -> None:
    """Leave the process group of several ranks (if any); a one-process group belongs to whoever made
    it (vLLM's engine makes one and destroys it itself at exit)."""
    import torch.distributed as dist

    if active():
        dist.destroy_process_group()
    _PEERS.clear()
    # after a failure torchrun's SIGTERM may still come while this process ends: it keeps exit code 2
    if not _REPORTED[0] and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is _terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _failure(exc: BaseException, what: str) -> DistributedError:
    """One line for a failed collective: who stopped, or the timeout."""
    text = str(exc).lower()
    n, me = world_size(), rank()
    _REPORTED[0] = True
    if "timed out" in text or "timeout" in text:  # gloo: "Timed out waiting ...", "Application timeout ..."
        return DistributedError(f"rank {me} of {n}: a collective ({what}) timed out after {_TIMEOUT[0]:.0f} s "
                                "waiting for the other ranks; nothing was written")
    other = _who_stopped() or (f"rank {1 - me} of 2 stopped" if n == 2 else f"another of the {n} ranks stopped")
    reason = first_line(exc)
    if "] " in reason:  # gloo's "[file.cc:537] Read error ...": the part after the source location
        reason = reason.split("] ", 1)[1]
    return DistributedError(f"rank {me} of {n}: {other} ({reason.split('. This is', 1)[0]}); nothing was written")


def _collective(what: str, nbytes: int, op: Callable[[], T]) -> T:
    start = time.perf_counter()
    try:
        return op()
    except RuntimeError as exc:  # gloo and NCCL report a lost peer or a timeout as RuntimeError subclasses
        raise _failure(exc, what) from None
    finally:
        _STATS["seconds"] += time.perf_counter() - start
        _STATS["calls"] += 1
        _STATS["bytes"] += nbytes


def collective_stats() -> dict:
    """Seconds spent in collectives (waiting for slower ranks included), their number and bytes, so far."""
    return {"collective_seconds": round(_STATS["seconds"], 3), "collectives": _STATS["calls"],
            "collective_bytes": _STATS["bytes"]}


def reset_stats() -> None:
    _STATS.update(seconds=0.0, calls=0, bytes=0)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over every rank, in place (the result is the same on every rank).

    Reductions of float64 statistics stay float64: each rank adds its own batches in float64 first,
    then the ranks' partial sums are added (a different order of float64 additions than one process
    takes; see docs/distributed.md).
    """
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("all_reduce_sum needs contiguous tensors (it reduces in place)")
        _collective("all-reduce", t.numel() * t.element_size(), lambda t=t: dist.all_reduce(t))


def broadcast_from(owner: int, tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank ``owner``'s, in place (bool tensors travel as bytes)."""
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("broadcast_from needs contiguous tensors (it writes in place)")
        buf = t.view(torch.uint8) if t.dtype == torch.bool else t
        _collective("broadcast", t.numel() * t.element_size(), lambda buf=buf: dist.broadcast(buf, owner))


def broadcast_json(owner: int, value: Any) -> Any:
    """Rank ``owner``'s JSON-serialisable ``value`` on every rank (JSON bytes, never a pickle)."""
    if not active():
        return value
    data = json.dumps(value).encode() if rank() == owner else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    broadcast_from(owner, [size])
    if rank() == owner:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(int(size), dtype=torch.uint8)
    broadcast_from(owner, [buf])
    return json.loads(buf.numpy().tobytes().decode()) if rank() != owner else value


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Plain numbers (token counts, energies) summed over every rank, as float64."""
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_sum([t])
    return t.tolist()


def gather_rows(values: Sequence[float]) -> list[list[float]]:
    """Every rank's ``values`` (same length on each), rank by rank."""
    row = torch.tensor([list(values)], dtype=torch.float64)
    if not active():
        return row.tolist()
    import torch.distributed as dist

    out = [torch.empty_like(row) for _ in range(world_size())]
    _collective("all-gather", row.numel() * 8 * world_size(), lambda: dist.all_gather(out, row))
    return [r[0].tolist() for r in out]


def digest(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted), or of bytes."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def check_same(parts: Mapping[str, str]) -> None:
    """Refuse to go on unless every rank has the same ``parts`` (name -> digest); the same error on every rank.

    The ranks exchange the digests (32 bytes each) and each compares them all, so a rank started with
    another model, target or calibration stops every rank at once, naming what differs.
    """
    if not active():
        return
    import torch.distributed as dist

    names = sorted(parts)
    mine = torch.tensor([list(bytes.fromhex(parts[k])) for k in names], dtype=torch.uint8)  # [parts, 32]
    out = [torch.empty_like(mine) for _ in range(world_size())]
    _collective("start-up check", mine.numel() * world_size(), lambda: dist.all_gather(out, mine))
    differ = {r: [k for i, k in enumerate(names) if not torch.equal(out[r][i], out[0][i])] for r in range(1, len(out))}
    differ = {r: d for r, d in differ.items() if d}
    if differ:
        text = "; ".join(f"rank {r} differs from rank 0 in {', '.join(d)}" for r, d in differ.items())
        raise SurgeonError(f"the {world_size()} ranks were not started alike ({text}): start every rank with "
                           "the same command, model and data")


def shard_bounds(n: int, batch_size: int, what: str = "calibration windows") -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n`` windows, cut at multiples of ``batch_size`` when possible.

    One process batches the windows ``batch_size`` at a time; cutting at the same batch boundaries
    gives every rank exactly the batches one process would form, so each batch's float32 statistics
    are bit-identical and only the float64 order in which the batches are added differs. With fewer
    batches than ranks the windows are split evenly instead (logged: the batches then differ).

    Raises:
        SurgeonError: fewer windows than ranks (naming both).

    Example:
        >>> shard_bounds(6, 2)  # one process: every window
        (0, 6)
    """
    world = world_size()
    if world == 1:
        return 0, n
    if n < world:
        raise SurgeonError(f"{n} {what} cannot be shared by {world} ranks: each rank needs at least one "
                           f"(give {world} or more, or start fewer ranks)")
    batches = -(-n // batch_size)
    r = rank()
    if batches >= world:
        lo, hi = (min(round(k * batches / world) * batch_size, n) for k in (r, r + 1))
        return lo, hi
    if r == 0:
        log.warning("%d %s in %d batches of %d for %d ranks: split evenly, so the batches (and their float32 "
                    "sums) differ from one process's", n, what, batches, batch_size, world)
    return round(r * n / world), round((r + 1) * n / world)


def split_windows(windows: torch.Tensor, batch_size: int, what: str = "calibration windows") -> torch.Tensor:
    """This rank's share of ``windows`` ``[N, T]`` (:func:`shard_bounds`); all of them with one process."""
    lo, hi = shard_bounds(int(windows.shape[0]), batch_size, what)
    return windows[lo:hi]


def assign(costs: Mapping[str, float]) -> dict[str, int]:
    """The rank that does each item's work: greedy bin-packing by estimated cost, the same on every rank.

    Items go, most expensive first (ties in the given order), to the rank with the least work so
    far (ties to the lower rank); with one process everything is rank 0's.

    Example:
        >>> assign({"a": 3.0, "b": 1.0})  # one process
        {'a': 0, 'b': 0}
    """
    world = world_size()
    load = [0.0] * world
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda k: -costs[k]):  # sorted() is stable: ties keep their order
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += costs[name]
    return {name: owner[name] for name in costs}


def share(items: Mapping[str, Sequence[torch.Tensor]], owners: Mapping[str, int]) -> None:
    """Send each item's tensors from its owner to every rank, in place (items in the given order)."""
    if not active():
        return
    for name, tensors in items.items():
        broadcast_from(owners[name], tensors)


def rank_report(seconds: float) -> dict:
    """Every rank's wall seconds, peak RSS and collective time (a collective: call it on every rank)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    stats = collective_stats()
    rows = gather_rows([seconds, peak, stats["collective_seconds"], stats["collectives"], stats["collective_bytes"]])
    return {"world_size": world_size(), "ranks": [
        {"rank": r, "seconds": round(row[0], 2), "peak_rss_mib": round(row[1], 1),
         "collective_seconds": round(row[2], 3), "collectives": int(row[3]), "collective_bytes": int(row[4])}
        for r, row in enumerate(rows)]}
