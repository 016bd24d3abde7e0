"""One rank of a data-parallel test run (tests/test_distributed.py); RANK, WORLD_SIZE, MASTER_* as torchrun sets them.

``python -m tests.dist_worker cases SPEC.json OUT`` prunes the model of SPEC (or the case's own) once per
case through the Python API and writes ``OUT/rank-R.json`` (each case's report, a digest of the final
weights, or its error); a case with ``terms`` instead adds them, one row per batch, into an
:class:`~base.distributed.OrderedSum` over this rank's batches and records the sum; a case with ``out``
prunes streamed (:func:`surgeon_export.api.prune_streamed`) into that directory, rank 0 recording the
digest of the tensors written. With ``TEST_FAULT=kill-sync`` rank ``TEST_FAULT_RANK`` (default 1) kills
itself right after streamed LLM Surgeon's ``TEST_FAULT_AT``-th barrier (``_Walk._sync``).

``python -m tests.dist_worker cli ARGS...`` runs ``surgeon-export ARGS...``; with ``TEST_FAULT=kill``
(``stall``) the rank ``TEST_FAULT_RANK`` (default 1) kills itself (stops responding) right after its
first decoder layer, which is what a crashed (hung) node looks like to the others; with
``TEST_FAULT=kill-busy`` it kills itself while the others sleep outside any collective, so that under
torchrun the launcher's SIGTERM reaches them before a failed collective could.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def weights_digest(tensors: dict) -> str:
    """SHA-256 of every tensor's name and bytes: equal digests, bit-identical weights."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ordered_sum(terms: list[list[float]]) -> dict:
    """The rows of ``terms`` (float32, one per batch of one window) added by :func:`base.distributed.over_batches`."""
    import torch

    from base.distributed import OrderedSum, batches_of, over_batches

    rows = torch.tensor(terms, dtype=torch.float32)  # [batches, n]
    acc = OrderedSum([rows.shape[1]], dtype=torch.float32)
    for lo, _ in over_batches(batches_of(rows.shape[0], 1), [acc]):
        acc.add(rows[lo], count=1)
    return {"sum": acc.sum.tolist(), "count": acc.count}


def run_cases(spec_file: Path, out: Path) -> None:
    from base import distributed as dist
    from base.errors import SurgeonError
    from base.loading import load_model
    from surgeon.sds import SDSConfig
    from surgeon_export import api

    spec = json.loads(spec_file.read_text())
    api.init_distributed(spec.get("timeout", 60))
    rank = dist.rank()
    results = {}
    for case in spec["cases"]:
        if "terms" in case:
            results[case["name"]] = ordered_sum(case["terms"])
            continue
        kwargs = dict(case["config"])
        for key, values in case.get("by_rank", {}).items():  # a rank started with other arguments
            kwargs[key] = values[rank]
        if "refine" in kwargs:
            kwargs["refine"] = SDSConfig(**kwargs["refine"])
        if "out" in case:
            results[case["name"]] = streamed_case(spec, case, api.build_config(kwargs.pop("method"), **kwargs))
            continue
        lm = load_model(case.get("model", spec["model"]))
        try:
            report = api.prune(lm, api.build_config(kwargs.pop("method"), **kwargs), calib_samples=case["calib_samples"],
                               seq_len=case["seq_len"], calib_text=spec.get("calib_text"),
                               checkpoint=Path(case["checkpoint"]) if case.get("checkpoint") else None)
        except SurgeonError as exc:
            results[case["name"]] = {"error": str(exc)}
            continue
        results[case["name"]] = {"digest": weights_digest(dict(lm.model.state_dict())), "report": report.to_dict()}
    (out / f"rank-{rank}.json").write_text(json.dumps(results))
    # leave the process group as the CLI does (cli.main): a gloo group still alive at interpreter exit may end
    # the process in std::terminate (SIGABRT, seen once in session 20 on a rank that had written its results)
    api.shutdown_distributed()


def streamed_case(spec: dict, case: dict, config: object) -> dict:
    from base import distributed as dist
    from base.errors import SurgeonError
    from surgeon_export import api
    from tests.conftest import tensors

    try:
        report = api.prune_streamed(case.get("model", spec["model"]), config, case["out"],  # type: ignore[arg-type]
                                    calib_samples=case["calib_samples"], seq_len=case["seq_len"],
                                    calib_text=spec.get("calib_text"), check=False)
    except SurgeonError as exc:
        return {"error": str(exc)}
    digest = weights_digest(tensors(Path(case["out"]))) if dist.is_main() else None
    return {"digest": digest, "report": report}


def fail_at_sync() -> None:
    """``TEST_FAULT=kill-sync``: this rank (``TEST_FAULT_RANK``) dies right after the ``TEST_FAULT_AT``-th barrier."""
    import surgeon.streamed_surgeon as streamed

    real, count = streamed._Walk._sync, [0]

    def sync() -> None:
        real()
        count[0] += 1
        if count[0] == int(os.environ["TEST_FAULT_AT"]) and os.environ.get("RANK") == os.environ.get("TEST_FAULT_RANK", "1"):
            os.kill(os.getpid(), signal.SIGKILL)

    streamed._Walk._sync = staticmethod(sync)  # type: ignore[method-assign]


def run_cli(args: list[str]) -> None:
    fault = os.environ.get("TEST_FAULT")
    if fault and fault != "kill-sync":
        import surgeon.driver

        real = surgeon.driver.run_layer

        def failing(layer, batches):  # type: ignore[no-untyped-def]
            out = real(layer, batches)
            if os.environ.get("RANK") == os.environ.get("TEST_FAULT_RANK", "1"):
                if fault.startswith("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # "stall": alive, but never joins the next collective
            elif fault == "kill-busy":  # the others are busy (not in a collective) when the launcher stops them
                time.sleep(60)
            return out

        surgeon.driver.run_layer = failing
    from surgeon_export.cli import main

    sys.argv = ["surgeon-export", *args]
    main()


if __name__ == "__main__":
    if os.environ.get("TEST_FAULT") == "kill-sync":
        fail_at_sync()
    if sys.argv[1] == "cases":
        run_cases(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        run_cli(sys.argv[2:])
