"""Data-parallel pruning over ``torch.distributed``: ranks, calibration batches, ordered sums, owners, broadcasts.

Launched with ``torchrun --nproc-per-node N [--nnodes M ...] -m surgeon_export prune ...`` (or any
script that calls the Python API under torchrun), every rank runs the same pruning code on its share
of the calibration batches (:func:`batches_of`: the batches one process forms, dealt round-robin).
The statistics each method needs are :class:`OrderedSum` s, one term per batch added in the batches'
global order whatever the number of ranks (:func:`over_batches`), so they come out bit-identical on
1, 2 or N ranks; the per-linear work is split by estimated cost (:func:`assign`) and its results are
sent from the rank that computed them to every other (:func:`broadcast_from`), so every rank ends
with the same model, one process's; rank 0 alone writes outputs.

With one process (no ``WORLD_SIZE`` above 1 in the environment and no process group) every
function here is a no-op: the rank is 0, the world size 1, every batch is this rank's, a term is
added to its sum at once, every item is owned by rank 0, broadcasts change nothing. The
single-process code path *is* the distributed one.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
_IDLE_LOGGED: set[tuple[int, int, int]] = set()  # (windows, batch size, world) whose idle ranks were logged
T = TypeVar("T")


class DistributedError(SurgeonError):
    """Another rank stopped or a collective timed out: one line, on every surviving rank."""


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset): whether this process was launched as one of many."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SurgeonError(f"WORLD_SIZE must be a number, got {os.environ['WORLD_SIZE']!r}") from None


def local_world_size() -> int:
    """``LOCAL_WORLD_SIZE`` as torchrun sets it (1 when unset or not a number): the ranks on this machine."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


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


def sum_over_ranks(values: Sequence[int]) -> list[int]:
    """Integers (token counts) summed over every rank: exact in any order (float64 holds them up to 2^53)."""
    if not active():
        return [int(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    _collective("all-reduce", t.numel() * 8, lambda: dist.all_reduce(t))
    return [int(v) for v in t.tolist()]


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


def batches_of(n: int, batch_size: int, what: str = "calibration windows") -> list[tuple[int, int]]:
    """This rank's calibration batches, as window ranges ``[lo, hi)``.

    The batches are the ones one process forms, ``batch_size`` consecutive windows by global index
    (the last may be shorter), whatever the number of ranks, and batch ``b`` is rank ``b mod world``'s:
    each batch's forward pass and float32 statistics are the same on any number of ranks, and the
    ranks' ``k``-th batches are consecutive, which :func:`over_batches` adds in order. Ranks beyond the
    number of batches get none (logged): they wait in the calibration passes and still take their
    share of the per-linear work.

    Example:
        >>> batches_of(5, 2)  # one process: every batch
        [(0, 2), (2, 4), (4, 5)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, n, batch_size)
    world = world_size()
    if len(starts) < world and rank() == 0 and (n, batch_size, world) not in _IDLE_LOGGED:
        _IDLE_LOGGED.add((n, batch_size, world))
        idle = f"rank {world - 1} has" if len(starts) == world - 1 else f"ranks {len(starts)}-{world - 1} have"
        log.warning("%d %s make %d batch%s of %d for %d ranks: %s no batch to run (the result does not depend on "
                    "it; smaller batches give them some)", n, what, len(starts), "es" * (len(starts) != 1), batch_size,
                    world, idle)
    return [(s, min(s + batch_size, n)) for s in starts[rank()::world]]


class OrderedSum:
    """A float64 sum of one term per calibration batch, added in the batches' global order on any number of ranks.

    One process adds each batch's term as it comes: ``sum += term`` (a float32 term is widened exactly,
    then added in float64). With several ranks, each rank keeps its batch's term until the round of
    :func:`over_batches` ends; then the rows of the sum are shared out, each rank adds every rank's
    term to its rows in rank order, which is the batches' order (:func:`batches_of`), and at the end
    every rank's rows go to every rank. Each float64 addition is then the one one process makes, in
    the same order: the sums are bit-identical on 1, 2 or N ranks.

    Args:
        shape: the terms' shape; the rows (first axis) are what the ranks share out.
        dtype: the terms' dtype, which a rank without a batch in a round must know (it receives the
            others' terms); taken from the first term when not given.
    """

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        self.sum = torch.zeros(*shape, dtype=torch.float64, device=device)
        self.count = 0  # items behind the sum (tokens), summed over the ranks at the end
        self.dtype = dtype
        self.term: torch.Tensor | None = None  # this rank's term of the current round (several ranks only)
        self.complete = not active()  # every rank's terms are in ``sum`` (one process: always)

    def add(self, term: torch.Tensor, count: int = 0) -> None:
        """This rank's term for its current batch (``count`` items behind it)."""
        if term.shape != self.sum.shape:
            raise ValueError(f"a term of shape {tuple(term.shape)} for a sum of shape {tuple(self.sum.shape)}")
        self.count += count
        self.dtype = term.dtype
        if not active():
            self.sum.add_(term)
            return
        if self.term is not None:
            raise RuntimeError("a calibration statistic got two terms from one batch")
        self.term = term.contiguous()


def _row_bounds(rows: int) -> list[tuple[int, int]]:
    """Each rank's rows ``[lo, hi)`` of a sum with ``rows`` rows (as even as they go; empty where fewer rows than ranks)."""
    world = world_size()
    return [(r * rows // world, (r + 1) * rows // world) for r in range(world)]


def _fold(s: OrderedSum, present: Sequence[int]) -> None:
    """End of a round: the terms of the ``present`` ranks, split by rows, to the ranks that add them, in rank order."""
    import torch.distributed as dist

    bounds = _row_bounds(s.sum.shape[0])
    lo, hi = bounds[rank()]
    if (s.term is not None) != (rank() in present):
        raise RuntimeError("a calibration statistic got no term from this rank's batch")
    if s.dtype is None:
        raise RuntimeError("a calibration statistic's dtype must be known on every rank")
    rest = tuple(s.sum.shape[1:])
    send = s.term if s.term is not None else torch.empty((0, *rest), dtype=s.dtype, device=s.sum.device)
    send_rows = [b - a for a, b in bounds] if s.term is not None else [0] * len(bounds)
    recv_rows = [hi - lo if r in present else 0 for r in range(len(bounds))]
    out = torch.empty((sum(recv_rows), *rest), dtype=s.dtype, device=s.sum.device)  # [present x rows, ...]
    _collective("all-to-all", send.numel() * send.element_size(),
                lambda: dist.all_to_all_single(out, send, recv_rows, send_rows))
    s.term = None
    if hi > lo:
        mine = s.sum[lo:hi]
        for part in out.split(hi - lo):  # rank order: the batches' order
            mine.add_(part)


def over_batches(items: Sequence[T], sums: Iterable[OrderedSum]) -> Iterator[T]:
    """This rank's batches ``items`` one at a time, each one's terms added to ``sums`` in the batches' global order.

    With one process: ``items`` as they are (each term was added at once). With several ranks every
    rank runs as many rounds as the rank with the most batches: after each round (one where this rank
    had no batch too) the round's terms are added (:class:`OrderedSum`, one all-to-all per sum);
    after the last, every rank's rows of each sum go to every rank, and the counts are summed.
    ``sums`` (shared ones once) must come in the same order on every rank.

    Example:
        >>> acc = OrderedSum([2])
        >>> for x in over_batches([1.0, 2.0], [acc]):
        ...     acc.add(torch.full([2], x))
        >>> acc.sum.tolist()
        [3.0, 3.0]
    """
    sums = list({id(s): s for s in sums}.values())
    if not active():
        yield from items
        return
    counts = [int(row[0]) for row in gather_rows([len(items)])]
    for j in range(max(counts)):
        if j < len(items):
            yield items[j]
        present = [r for r, c in enumerate(counts) if j < c]
        for s in sums:
            _fold(s, present)
    for s in sums:
        for r, (lo, hi) in enumerate(_row_bounds(s.sum.shape[0])):
            if hi > lo:
                broadcast_from(r, [s.sum[lo:hi]])
    for s, total in zip(sums, sum_over_ranks([s.count for s in sums])):
        s.count, s.complete = total, True


def assign(costs: Mapping[str, float]) -> dict[str, int]:
    """The rank that does each item's work: greedy bin-packing by estimated cost, the same on every rank.

    Items go, most expensive first (ties in the given order), to the rank with the least work so
    far (ties to the higher rank: rank 0 also writes the shards and evaluates, so the heaviest item
    goes elsewhere); with one process everything is rank 0's.

    Example:
        >>> assign({"a": 3.0, "b": 1.0})  # one process
        {'a': 0, 'b': 0}
    """
    world = world_size()
    load = [0.0] * world
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda k: -costs[k]):  # sorted() is stable: ties keep their order
        r = min(range(world), key=lambda i: (load[i], -i))
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
    from base.env import peak_rss_mib

    peak = peak_rss_mib()  # the whole run's, whatever per-layer windows reset the kernel's mark
    stats = collective_stats()
    rows = gather_rows([seconds, peak, stats["collective_seconds"], stats["collectives"], stats["collective_bytes"]])
    return {"world_size": world_size(), "ranks": [
        {"rank": r, "seconds": round(row[0], 2), "peak_rss_mib": round(row[1], 1),
         "collective_seconds": round(row[2], 3), "collectives": int(row[3]), "collective_bytes": int(row[4])}
        for r, row in enumerate(rows)]}
