"""The ``surgeon-export`` command line: one command per stage, each building a config and calling
one library function. User mistakes (:class:`SurgeonError`) print one line and exit with code 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupted_while_importing(signum: int, frame: object) -> None:
    """Ctrl-C while torch and transformers import (seconds): the same line as later, no traceback."""
    sys.stderr.write("interrupted; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


_previous_sigint = (signal.signal(signal.SIGINT, _interrupted_while_importing)
                    if threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGINT) is signal.default_int_handler else None)

import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

if _previous_sigint is not None:
    signal.signal(signal.SIGINT, _previous_sigint)
INTERRUPTED = 130  # typer turns a KeyboardInterrupt into this exit code
NOTHING_WRITTEN = "interrupted; nothing was written"

app = typer.Typer(
    name="surgeon-export",
    help="Prune language models, export them to deployable formats, run and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Hugging Face model directory or .gguf file; default: SmolLM2-135M-Instruct."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log messages.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")]
Force = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")]
Recover = Annotated[bool, typer.Option("--recover/--no-recover", help="After pruning, distil the pruned model from the dense one (KL on logits), the pruned structure frozen (docs/recovery.md).")]
RecoverSteps = Annotated[int, typer.Option(help="--recover: training steps (one window each).")]
RecoverLr = Annotated[Optional[float], typer.Option(help="--recover: peak learning rate (default 1e-4 for the kept weights, 1e-3 with --recover-rank).")]
RecoverRank = Annotated[int, typer.Option(help="--recover: 0 trains the kept weights directly; R > 0 trains masked low-rank adapters of rank R, merged at the end.")]
RecoverData = Annotated[str, typer.Option(help="--recover: calibration (WikiText-2 validation or --calib-text; never the evaluation split) or generated (text the dense model samples itself).")]
RecoverWindows = Annotated[int, typer.Option(help="--recover: training windows of --recover-seq-len tokens.")]
RecoverSeqLen = Annotated[int, typer.Option(help="--recover: tokens per training window.")]
RECOVER_STEPS = 200  # about 15 CPU-minutes on the default model (docs/recovery.md)


def recovery_line(r: dict) -> str:
    """One line on what recovery did (the report's ``recover`` entry)."""
    return (f"recovery: {r['steps']} steps, distillation loss {r['loss_first10']:.4f} -> {r['loss_last10']:.4f} "
            f"(means of the first and last 10), {r['seconds']:.0f} s"
            + (f"; STOPPED, {r['diverged']}: the model before recovery is kept" if r["diverged"] else ""))


def _api():
    """The API (surgeon_export.api), imported when a command runs: ``--help`` starts without torch."""
    from surgeon_export import api

    return api


def _error(message: str) -> Exception:
    """A user mistake found by the command line itself: one ``error:`` line, exit code 2."""
    return _api().SurgeonError(message)


def recover_config(steps: int, lr: float | None, rank: int, seq_len: int):
    """The recovery config of the command line (the learning rate's default depends on the form)."""
    return _api().RecoverConfig(steps=steps, lr=lr if lr is not None else (1e-3 if rank else 1e-4), rank=rank,
                                seq_len=seq_len)


DataDir = Annotated[
    Optional[Path],
    typer.Option(help="Directory with wikitext-2-raw/wiki.test.raw and wikitext-2/valid.txt (default: $SURGEON_EXPORT_DATA, else the copies packaged with surgeon-export)."),
]


def _setup(quiet: bool, threads: int | None, distributed: bool = False) -> bool:
    """Logging and threads; under torchrun (``distributed``: the command runs data-parallel) every rank
    but 0 is quiet. Returns whether this process is quiet."""
    api = _api()
    world, rank = api.launched_ranks()
    if world > 1 and not distributed:
        raise _error(f"only `prune` runs data-parallel under torchrun ({world} ranks here); run this command "
                     "in one process")
    quiet = quiet or rank != 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if quiet else "%(message)s",
        stream=sys.stderr,
    )
    api.set_threads(threads)
    return quiet


def _target(out: Path | None, what: str, force: bool, source: object = None, kind: str = "DIR") -> Path:
    """``--out``, required, checked before any work (:func:`surgeon_export.api.prepare_target`)."""
    if out is None:
        raise _error(f"give --out {kind} for {what}")
    if kind == "DIR":
        _api().prepare_target(out, force, source=source)
    return out


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for line in lines:
            typer.echo(line)


@app.command("eval")
def eval_cmd(
    model: ModelArg = None,
    text: Annotated[Optional[Path], typer.Option(help="Evaluate on this text file instead of WikiText-2 test.")] = None,
    data_dir: DataDir = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option(help="Evaluate the first N windows.")] = 64,
    full: Annotated[bool, typer.Option("--full", help="Evaluate every window of the text.")] = False,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Perplexity of a model on the protocol (WikiText-2 test, 512-token windows, first 64)."""
    _setup(quiet, threads)
    r = _api().evaluate_model(model, text=text, data_dir=data_dir, seq_len=seq_len, windows=None if full else windows,
                              batch_size=batch_size, progress=not quiet)
    _emit(r, as_json, [
        f"perplexity {r['perplexity']:.3f}  ({r['windows']} windows x {seq_len} tokens, "
        f"{r['tokens']} predicted; {Path(r['text']).name}; {r['seconds']:.0f} s)",
        f"model: {r['model']}",
    ])


SDS_HELP = "SDS (--refine sds): "
PruneOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned checkpoint here.")]
Method = Annotated[str, typer.Option(help="surgeon (LLM Surgeon), sparsegpt, wanda or magnitude.")]
Sparsity = Annotated[Optional[float], typer.Option(help="Unstructured: fraction of each linear's weights to remove.")]
Pattern = Annotated[Optional[str], typer.Option(help="Semi-structured KEPT:BLOCK, e.g. 2:4.")]
Structured = Annotated[Optional[float], typer.Option(help="surgeon: structured, fraction of decoder-linear weights to keep (e.g. 0.7); combine with --pattern for structured then N:M.")]
CalibSamples = Annotated[Optional[int], typer.Option(help="Calibration windows (default 64; 16 for surgeon --structured).")]
Shots = Annotated[int, typer.Option(help="surgeon: pruning shots, each re-estimating the curvature.")]
KfacSamples = Annotated[Optional[int], typer.Option(help="surgeon: windows for K-FAC's backward passes (G); A then comes from all --calib-samples, forward only (default 16 for unstructured and N:M, all windows for --structured).")]
CalibBatch = Annotated[int, typer.Option(help="sparsegpt, wanda, magnitude: windows per forward pass of the layer-wise statistics (under torchrun, the unit the ranks share: ranks beyond the number of batches wait).")]
KfacBatch = Annotated[int, typer.Option(help="surgeon: windows per K-FAC forward/backward pass; 2 cuts the default model's K-FAC peak memory from 9.3 to 6.4 GiB for ~10% more K-FAC time, 1 to 5.7 GiB for ~30% (same factors up to rounding).")]
Allocation = Annotated[Optional[str], typer.Option(help="--structured and surgeon: global (costs compared across layers) or uniform (the same MLP channels in every layer); default: each method's measured best, global for surgeon, uniform for wanda and magnitude --structured (Wanda-style 80%: 50.14 uniform vs 202.1 global).")]
Correlation = Annotated[str, typer.Option(help="surgeon: joint (exact OBS update of all removals under G x A), rows (per-row updates spread through G) or none (per row, G ignored).")]
GroupCost = Annotated[str, typer.Option(help="surgeon --structured: output (down/o column costs and updates; default, measured best) or sum (every member of a coupled group).")]
Fisher = Annotated[str, typer.Option(help="surgeon: empirical or true Fisher.")]
Checkpoint = Annotated[Optional[Path], typer.Option(help="surgeon: save state after every shot here; rerun to resume.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration and evaluation window.")]
CalibText = Annotated[Optional[Path], typer.Option(help="Calibrate on this text file.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration window offsets.")]
TrueSequential = Annotated[bool, typer.Option(help="Re-collect inputs after each group of linears.")]
Refine = Annotated[Optional[str], typer.Option(help="sds: sparse-dense-sparse refinement after the first pruning (unstructured and N:M).")]
SdsL1 = Annotated[Optional[float], typer.Option(help=SDS_HELP + "L1 weight of the dense step (units of mean |W| x mean input energy; default 0.1).")]
SdsL2 = Annotated[Optional[float], typer.Option(help=SDS_HELP + "ridge toward the dense weights in the dense step and the adjustment (units of mean input energy; default 0.01, SparseGPT's damping).")]
SdsEpochs = Annotated[Optional[int], typer.Option(help=SDS_HELP + "dense-step iterations, each a full pass over the calibration statistics (default 100).")]
SdsAdjustEpochs = Annotated[Optional[int], typer.Option(help=SDS_HELP + "soft mask adjustment iterations after re-pruning (default 100).")]
SdsTeacher = Annotated[Optional[str], typer.Option(help=SDS_HELP + "what each linear reconstructs: self (the dense weights on the pruned model's inputs; default), layer (the dense layer on the pruned stream) or dense (the dense model's own activations).")]
Align = Annotated[int, typer.Option(help="structured: round kept sizes up to a multiple of N in the saved checkpoint.", min=1)]
Evaluate = Annotated[bool, typer.Option("--eval/--no-eval", help="Perplexity of the pruned model (protocol).")]
Streaming = Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="Layer by layer: one decoder layer in memory, read from disk and written to --out as it is pruned (every method; LLM Surgeon walks the layers forward and back each shot, its files beside --out). Default: when the whole model would not fit in memory.")]
MaxMemory = Annotated[Optional[str], typer.Option(help="Memory budget for choosing streaming, e.g. 8GiB (default: the memory available).")]
BosStatistics = Annotated[str, typer.Option(help="Where calibration windows lead with BOS (the tokenizer's convention, e.g. Gemma's): include its position in the calibration statistics, or exclude it. Measured on the default model with BOS-first windows: including is better for structured pruning (docs/llm_surgeon.md, BOS).")]
CheckStreaming = Annotated[Optional[bool], typer.Option("--check-streaming/--no-check-streaming", help="After a streamed run, load the written model whole and check that every decoder layer's outputs along the layer-at-a-time path equal the model's own forward pass on two calibration windows (warns where they differ). Default: when the whole model fits in half the memory available.")]
LoraBetweenShots = Annotated[int, typer.Option(help="surgeon: steps of the masked low-rank update (rank --recover-rank, default 8) between shots, distilled from the dense model; 0: off.")]
DistTimeout = Annotated[float, typer.Option(help="Under torchrun: seconds a collective waits for the other ranks before every rank stops with an error (docs/distributed.md).")]


@app.command("prune")
def prune_cmd(
    model: ModelArg = None, out: PruneOut = None, method: Method = "sparsegpt", sparsity: Sparsity = None,
    pattern: Pattern = None, structured: Structured = None, calib_samples: CalibSamples = None, shots: Shots = 3,
    kfac_samples: KfacSamples = None, kfac_batch: KfacBatch = 4, calib_batch: CalibBatch = 8,
    allocation: Allocation = None,
    correlation: Correlation = "joint", group_cost: GroupCost = "output", fisher: Fisher = "empirical",
    checkpoint: Checkpoint = None, seq_len: SeqLen = 512, calib_text: CalibText = None, seed: Seed = 0,
    true_sequential: TrueSequential = False, refine: Refine = None, sds_l1: SdsL1 = None, sds_l2: SdsL2 = None,
    sds_epochs: SdsEpochs = None, sds_adjust_epochs: SdsAdjustEpochs = None, sds_teacher: SdsTeacher = None,
    align: Align = 1, evaluate: Evaluate = True, streaming: Streaming = None, max_memory: MaxMemory = None,
    bos_statistics: BosStatistics = "include", check_streaming: CheckStreaming = None, recover: Recover = False,
    recover_steps: RecoverSteps = RECOVER_STEPS, recover_lr: RecoverLr = None, recover_rank: RecoverRank = 0,
    recover_data: RecoverData = "calibration", recover_windows: RecoverWindows = 256,
    recover_seq_len: RecoverSeqLen = 256, lora_between_shots: LoraBetweenShots = 0, data_dir: DataDir = None,
    force: Force = False, dist_timeout: DistTimeout = 600.0, threads: Threads = None, quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Prune a model (LLM Surgeon, or SparseGPT / Wanda / magnitude layer by layer); optionally recover, save and evaluate it.

    Under ``torchrun --nproc-per-node N`` it runs data-parallel: the ranks share the calibration windows and
    the per-linear work, and rank 0 alone evaluates, writes and prints (docs/distributed.md).
    """
    quiet = _setup(quiet, threads, distributed=True)
    api = _api()
    if refine is not None:
        api.check_choice("--refine", refine, ("sds",))
    sds_options = {"l1": sds_l1, "l2": sds_l2, "epochs": sds_epochs, "adjust_epochs": sds_adjust_epochs,
                   "teacher": sds_teacher}
    sds = api.SDSConfig(**{k: v for k, v in sds_options.items() if v is not None}) if refine else None
    if lora_between_shots < 0:
        raise _error(f"--lora-between-shots must be 0 (off) or a number of steps, got {lora_between_shots}")
    cfg = api.build_config(
        method, sparsity=sparsity, pattern=pattern, structured=structured, shots=shots, allocation=allocation,
        correlation=correlation, group_cost=group_cost, fisher=fisher, kfac_samples=kfac_samples,
        kfac_batch=kfac_batch, calib_batch=calib_batch, calib_samples=calib_samples, true_sequential=true_sequential,
        refine=sds,
        between_shots=(recover_config(lora_between_shots, recover_lr, recover_rank or 8, recover_seq_len)
                       if lora_between_shots else None),
    )
    payload = api.prune_job(cfg, api.PruneJob(
        model=model, out=out, calib_samples=calib_samples, seq_len=seq_len, seed=seed, calib_text=calib_text,
        data_dir=data_dir, bos_statistics=bos_statistics, checkpoint=checkpoint, streaming=streaming,
        max_memory=api.parse_bytes(max_memory) if max_memory is not None else None, check_streaming=check_streaming,
        align=align, evaluate=evaluate, force=force, progress=not quiet, dist_timeout=dist_timeout,
        recover=recover_config(recover_steps, recover_lr, recover_rank, recover_seq_len) if recover else None,
        recover_data=recover_data, recover_windows=recover_windows,
    ))
    if payload:  # rank 0 prints; the other ranks of a torchrun job get nothing
        _emit(payload, as_json, _prune_lines(payload, method, sparsity, structured, cfg.pattern, sds is not None))


def _prune_lines(payload: dict, method: str, sparsity: float | None, structured: float | None, pattern: object,
                 sds: bool) -> list[str]:
    """What ``prune`` prints: the pruning, SDS, recovery, perplexity and where the model went."""
    what = " + ".join(x for x in (f"structured {structured:.0%} kept" if structured is not None else "",
                                  str(pattern) if pattern else "",
                                  f"{sparsity:.0%}" if sparsity is not None else "") if x)
    lines = [f"{method}{' + SDS' if sds else ''} {what}: decoder-linear sparsity {payload['sparsity']:.2%}, "
             f"pruned in {payload['seconds']:.0f} s{' (streamed)' if payload.get('streamed') else ''}"]
    if sds:
        summary = payload["refine"]["summary"]
        lines.append(f"SDS: mean relative layer error {summary['mean_error']['first']:.4f} (first round) -> "
                     f"{summary['mean_error_used']:.4f}; linears using the re-pruned mask "
                     f"{summary['choices'].get('sds', 0)}, their first-round mask adjusted "
                     f"{summary['choices'].get('first mask', 0)}, first-round weights {summary['fallbacks']}; "
                     f"{summary['seconds']:.0f} s in refinement")
    if "recover" in payload:
        lines.append(recovery_line(payload["recover"]))
    if "perplexity" in payload:
        lines.append(f"perplexity {payload['perplexity']['perplexity']:.3f}")
    out = payload.get("out")
    if out is not None and structured is not None and payload.get("streamed"):
        lines.append(f"saved to {out}: the removed groups are zeros in the source's shapes (`surgeon-export shrink "
                     f"{out} --out DIR` cuts them out)")
    elif out is not None and structured is not None:
        lines.append(f"saved a smaller model to {out}: {payload['remaining_fraction']:.2%} of decoder-linear weights remain")
    elif out is not None:
        lines.append(f"saved to {out} (sparsity counted in the saved tensors: {payload['saved_sparsity']:.2%})")
    return lines


@app.command("shrink")
def shrink_cmd(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the smaller checkpoint here.")] = None,
    align: Annotated[int, typer.Option(help="Round every kept size to a multiple of N (1: off).", min=1)] = 1,
    rounding: Annotated[str, typer.Option(help="Which multiple --align picks: up (brings back only zero groups: the same function, up to float32 rounding), down or nearest.")] = "up",
    uniform: Annotated[bool, typer.Option("--uniform", help="Same sizes in every layer: a stock-architecture checkpoint.")] = False,
    layout: Annotated[str, typer.Option(help="default (per-layer sizes, served by our vLLM plugin; stock where the layers are equal) or nemotron-nas (NVIDIA's DeciLMForCausalLM: stock vLLM serves it with --trust-remote-code; needs the same query heads in every layer, docs/vllm.md).")] = "default",
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Cut the fully zeroed MLP channels and attention heads out of a masked model and save it smaller."""
    _setup(quiet, None)
    api = _api()
    if rounding not in ("up", "down", "nearest"):
        raise _error(f"--rounding must be up, down or nearest, got {rounding!r}")
    cfg = api.ShrinkConfig(align=align, rounding=rounding, uniform=uniform, layout=layout)  # type: ignore[arg-type]
    out = _target(out, "the smaller checkpoint", force, model)
    lm = api.load(model)
    api.check_align(lm, align)
    report = api.shrink(lm, out, cfg, force=force)
    shrink = report["shrink"]
    payload = {"model": lm.source, "out": str(out), **{k: v for k, v in shrink.items() if k != "manifest"},
               "checkpoint_format": report["checkpoint_format"], "layers": report["layers"],
               "bytes_on_disk": report["bytes_on_disk"], **{k: report[k] for k in ("nemotron_nas",) if k in report}}
    _emit(payload, as_json, [
        f"decoder linears: {shrink['decoder_linear_params_before']:,} -> {shrink['decoder_linear_params_after']:,} "
        f"parameters ({shrink['remaining_fraction']:.2%}); largest logit change {shrink['max_logit_change']:.2e}",
        f"saved {report['checkpoint_format']} checkpoint to {out}",
        *([f"serve it with `vllm serve {out} --trust-remote-code`; SGLang: {report['nemotron_nas']['sglang']}"]
          if "nemotron_nas" in report else []),
    ])


@app.command("run")
def run_cmd(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the pruned model and the benchmark.")] = Path("surgeon-out"),
    structured: Annotated[float, typer.Option(help="Fraction of decoder-linear weights to keep.")] = 0.8,
    method: Annotated[str, typer.Option(help="Structured scores: surgeon (LLM Surgeon: K-FAC costs, correlated updates) or wanda (Wanda-style channel scores, no update).")] = "surgeon",
    allocation: Annotated[str, typer.Option(help="uniform (the same MLP channels in every layer; measured best at 80%) or global (channels and heads compete across layers; surgeon only).")] = "uniform",
    shots: Annotated[int, typer.Option(help="LLM Surgeon shots.")] = 3,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows of 512 tokens.")] = 16,
    ppl_windows: Annotated[int, typer.Option(help="Perplexity windows in the benchmark (protocol: 64).")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration and evaluation window.")] = 512,
    text: Annotated[Optional[Path], typer.Option(help="Calibrate and evaluate on this text instead of WikiText-2.")] = None,
    data_dir: DataDir = None,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Also export the dense and the pruned model to ONNX and benchmark both on ONNX Runtime (pruned against dense on the same runtime).")] = True,
    runtimes: Annotated[bool, typer.Option("--runtimes/--no-runtimes", help="Also benchmark dense and pruned on llama.cpp, when installed (float32 GGUF: the pruned one written to OUT/pruned-gguf, the dense one once into the model cache).")] = True,
    openvino: Annotated[bool, typer.Option("--openvino/--no-openvino", help="Also benchmark dense and pruned on OpenVINO (the ONNX exports), when installed; off by default to keep the main job short.")] = False,
    recover: Recover = False,
    recover_steps: RecoverSteps = RECOVER_STEPS,
    recover_lr: RecoverLr = None,
    recover_rank: RecoverRank = 0,
    recover_data: RecoverData = "calibration",
    recover_windows: RecoverWindows = 256,
    recover_seq_len: RecoverSeqLen = 256,
    force: Force = False,
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """The main job: structured pruning, write the physically smaller model, export it to ONNX, benchmark dense vs pruned."""
    _setup(quiet, threads)
    api = _api()
    api.check_choice("--allocation", allocation, ("uniform", "global"))
    payload = api.run(api.RunConfig(
        model=model, out=out, structured=structured, method=method, allocation=allocation, shots=shots,
        calib_samples=calib_samples, ppl_windows=ppl_windows, seq_len=seq_len, text=text, data_dir=data_dir,
        onnx=onnx, runtimes=runtimes, openvino=openvino, progress=not quiet, force=force,
        recover=recover_config(recover_steps, recover_lr, recover_rank, recover_seq_len) if recover else None,
        recover_windows=recover_windows, recover_data=recover_data,
    ))
    _emit(payload, as_json, [
        api.markdown(payload["benchmark"]),
        f"pruned model: {out / 'pruned'} ({payload['remaining_fraction']:.1%} of decoder-linear weights remain); "
        f"benchmark: {out / 'benchmark.json'}",
        *([recovery_line(payload["recover"])] if "recover" in payload else []),
    ])


@app.command("pack")
def pack_cmd(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the compressed checkpoint here.")] = None,
    layout: Annotated[str, typer.Option("--format", help="2:4 or another N:M such as 4:8 (semi-structured), csr or bsr (unstructured).")] = "2:4",
    dtype: Annotated[Optional[str], typer.Option(help="Store as float32, float16 or bfloat16 (default: as loaded, float32).")] = None,
    blocksize: Annotated[str, typer.Option(help="bsr: block ROWSxCOLS dividing every decoder linear.")] = "4x4",
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Pack every decoder linear of a pruned model as N:M (2:4), CSR or BSR (pattern checked in the weights)."""
    _setup(quiet, None)
    api = _api()
    cfg = api.PackConfig(layout=layout, dtype=dtype, blocksize=api.parse_blocksize(blocksize))  # type: ignore[arg-type]
    out = _target(out, "the compressed checkpoint", force, model)
    lm = api.load(model)
    manifest = api.pack(lm, out, cfg, force=force)
    size, lin = manifest["bytes"], manifest["decoder_linear"]
    _emit({"model": lm.source, "out": str(out), **manifest}, as_json, [
        f"packed {manifest['packed_tensors']} decoder linears as {layout} ({manifest['dtype']}; "
        f"{lin['sparsity']:.2%} zeros, checked) to {out}",
        f"bytes on disk {size['file']:,} vs dense {size['dense_tensors']:,} ({size['file_vs_dense']:.3f}x); "
        f"decoder linears {size['decoder_linear_packed']:,} vs {size['decoder_linear_dense']:,} "
        f"({size['decoder_linear_ratio']:.4f}x)",
    ])


@app.command("densify")
def densify_cmd(
    directory: Annotated[Path, typer.Argument(help="A compressed checkpoint written by `surgeon-export pack`.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the dense checkpoint here.")] = None,
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write a compressed checkpoint back as a normal dense one that plain transformers loads."""
    _setup(quiet, None)
    out = _target(out, "the dense checkpoint", force, directory)
    result = _api().densify(directory, out, force=force)
    _emit(result, as_json, [f"wrote a dense checkpoint ({result['tensors']} tensors, "
                            f"{result['bytes_on_disk']:,} bytes) to {out}"])


@app.command("onnx")
def onnx_cmd(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the ONNX export directory here.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights and KV cache of the graph: float32 or float16.")] = "float32",
    opset: Annotated[int, typer.Option(help="ONNX opset, 14 to 20.", min=14, max=20)] = 17,
    external_data: Annotated[str, typer.Option(help="Weights in model.onnx_data: auto (above 1 GiB), always or never.")] = "auto",
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Fold traced shape arithmetic into constants.")] = True,
    optimize: Annotated[bool, typer.Option("--optimize", help="Also fuse with onnxruntime's transformer optimizer (ONNX Runtime-only ops).")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare ONNX Runtime with torch before keeping the graph.")] = True,
    uniform_cache: Annotated[bool, typer.Option("--uniform-cache", help="Per-layer shapes: one KV-head count at the graph boundary and a stock config, for optimum's ORTModelForCausalLM.")] = False,
    force: Force = False,
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Export a model to ONNX with KV cache (optimum's input/output names), checked against torch."""
    _setup(quiet, threads)
    api = _api()
    cfg = api.OnnxConfig(opset=opset, dtype=dtype, external_data=external_data,  # type: ignore[arg-type]
                         simplify=simplify, optimize=optimize, verify=verify, uniform_cache=uniform_cache)
    cfg.validate()
    out = _target(out, "the ONNX export", force, model)
    manifest = api.export_onnx(api.load(model), out, cfg, force=force)
    graph, check = manifest["graph"], manifest.get("verification")
    _emit({k: v for k, v in manifest.items() if k != "decoder_linears"} | {"out": str(out)}, as_json, [
        f"wrote {out} in {manifest['export_seconds']:.0f} s: opset {graph['opset']}, {graph['dtype']}, "
        f"{graph['num_layers']} layers, KV heads {sorted(set(graph['kv_heads']))}, {manifest['bytes_on_disk'] / 2**20:.1f} MiB",
        f"decoder-linear zeros in the graph: {manifest['sparsity']:.2%}; "
        f"2:4 blocks {manifest['blocks_2_4']['with_two_zeros']:,} of {manifest['blocks_2_4']['blocks']:,}",
        f"ONNX Runtime vs torch: largest logit difference {check['max_abs_diff']:.2e}" if check else "not verified",
    ])


@app.command("gguf")
def gguf_cmd(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The .gguf file to write.")] = None,
    tensor_type: Annotated[str, typer.Option("--type", help="Weight type: f32, f16, bf16 or q8_0.")] = "f16",
    uniform: Annotated[bool, typer.Option("--uniform", help="Refuse per-layer shapes: the stock llama.cpp architecture only (llama, qwen2, qwen3, gemma, gemma2, gemma3).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    ffn_align: Annotated[int, typer.Option("--ffn-align", help="Pad MLP widths with zero channels to a multiple of this, for llama.cpp's fast matmul (1: never).")] = 32,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Export a model to one GGUF file for llama.cpp (Llama and Gemma families; per-layer Llama/Qwen2 shapes as llama.cpp's 'deci'; docs/gguf.md)."""
    _setup(quiet, None)
    out = _target(out, "the GGUF export", force, kind="FILE.gguf")
    m = _api().export_gguf(model, out, tensor_type=tensor_type, uniform=uniform, force=force, ffn_align=ffn_align)
    _emit(m, as_json, [f"wrote {out}: llama.cpp '{m['architecture']}', {m['tensor_type']}, {len(m['layers'])} layers, "
                       f"{m['tensor_count']} tensors, {m['bytes'] / 2**20:.1f} MiB"])


@app.command("generate")
def generate_cmd(
    model: Annotated[str, typer.Argument(help="Model directory (torch), ONNX export directory (onnxruntime, openvino), .gguf file or directory (llama.cpp), or 'default'.")] = "default",
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")] = None,
    backend: Annotated[str, typer.Option(help="Runtime backend: torch, onnxruntime, openvino, llama.cpp, vllm (and any registered one).")] = "torch",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt at most.")] = 32,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of taking the argmax.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set with this probability (1: all).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stop: Annotated[Optional[list[int]], typer.Option(help="Stop token id (repeatable; default: the model's EOS).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")] = False,
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Generate text with the KV cache on one backend (greedy or sampling, stop tokens, batch)."""
    _setup(quiet, threads)
    api = _api()
    python = api.backend_python(backend)
    if python is not None:  # vLLM lives in its own environment: this same command runs there
        api.rerun_in(python)
    cfg = api.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed)
    cfg.validate()  # before the model loads
    r = api.generate_report(backend, model, prompt or ["The capital of France is"], cfg,
                            stop=tuple(stop) if stop else None, device=device, threads=threads, chat=chat)
    speed = r["decode_tokens_per_s"]
    _emit(r, as_json, [*(f"{o['prompt']!r} -> {o['text']!r}" for o in r["outputs"]),
                       f"{backend}: prefill {r['prefill_seconds']:.3f} s" + (f", decode {speed:.1f} tokens/s" if speed else "")])


@app.command("vllm-setup")
def vllm_setup_cmd(
    target: Annotated[Optional[Path], typer.Option("--env", help="Where to create it (default: $SURGEON_EXPORT_VLLM_ENV, else the model cache).")] = None,
    quiet: Quiet = False,
) -> None:
    """Create vLLM's own environment (vLLM CPU build, this package, pins vLLM accepts) for --backend vllm."""
    _setup(quiet, None)
    typer.echo(f"vLLM environment ready: {_api().setup_vllm(target, quiet=quiet)}")


@app.command("info")
def info_cmd(model: ModelArg = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """Architecture, shapes, parameter counts and measured zeros of a model."""
    _setup(quiet, None)
    r = _api().info(model)
    counts = r["parameters"]

    def span(key: str) -> str:
        values = [s[key] for s in r["layer_shapes"]]
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    _emit(r, as_json, [
        f"{r['model']}: {r['model_type']}, {r['layers']} layers, hidden {r['hidden_size']}, intermediate "
        f"{span('intermediate_size')}, {span('num_attention_heads')} query / {span('num_key_value_heads')} KV heads",
        f"parameters {counts['total']:,}; decoder linears {counts['decoder_linear']:,} "
        f"({counts['decoder_linear_zeros'] / counts['decoder_linear']:.4%} zeros)",
        f"weights: {r['path']}",
    ])


@app.command("bench")
def bench_cmd(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Models as [LABEL=]PATH (or 'default'); the first is the baseline of every ratio, and the first on each backend that runtime's baseline too (ratios on the same runtime).")] = None,
    backend: Annotated[Optional[list[str]], typer.Option(help="Backend for all models, or once per model.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, float16 on CUDA), float32, float16 or bfloat16.")] = "auto",
    prefill: Annotated[str, typer.Option(help="Prefill cells BATCHxLENGTH, comma-separated ('none' to skip).")] = "1x128,8x512",
    decode: Annotated[str, typer.Option(help="Decode batch sizes, comma-separated ('none' to skip).")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="Timed greedy decode steps per repetition.")] = 128,
    prompt_len: Annotated[int, typer.Option(help="Synthetic prompt length before decoding.")] = 128,
    repeat: Annotated[int, typer.Option(help="Timed repetitions per cell (at least 5).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up repetitions per cell.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompts.")] = 0,
    ppl_windows: Annotated[int, typer.Option(help="Perplexity on the first N windows.")] = 64,
    ppl_seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    text: Annotated[Optional[Path], typer.Option(help="Perplexity on this text file instead of WikiText-2 test.")] = None,
    data_dir: DataDir = None,
    isolation: Annotated[str, typer.Option(help="process (one worker per model) or inline.")] = "process",
    out: Annotated[Path, typer.Option("--out", "-o", help="Result JSON; .md and .png files go beside it.")] = Path("benchmark.json"),
    baseline: Annotated[Optional[Path], typer.Option(help="Stored result JSON to gate against (exit 1 on regression).")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed worsening per gated metric, e.g. 5% or 0.05.")] = "5%",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out result file.")] = False,
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Perplexity, prefill latency, decode tokens/s, memory and size of models; ratios to the first, and to the first on the same backend."""
    _setup(quiet, threads)
    api = _api()
    cfg = api.bench_config(models or ["default"], backend or ["torch"], device=device, dtype=dtype, prefill=prefill,
                           decode=decode, prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat, warmup=warmup,
                           seed=seed, isolation=isolation, progress=not quiet,
                           ppl=None if no_ppl else api.PplConfig(windows=ppl_windows, seq_len=ppl_seq_len,
                                                                 text=str(text) if text else None,
                                                                 data_dir=str(data_dir) if data_dir else None))
    result = api.bench(cfg, out, baseline, api.parse_tolerance(max_regression), force=force)
    written = ", ".join([str(out), result["outputs"]["markdown"], *result["outputs"]["plots"]])
    _emit(result, as_json, [api.markdown(result), f"written: {written}"])  # markdown holds any gate table
    gate = result["gate"]
    if gate is not None and not gate["passed"]:
        if as_json:
            typer.echo(api.gate_table(gate), err=True)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2.

    Command-line mistakes that typer catches (a value that is not a number, an unknown option) are
    user errors too: one ``error:`` line, not a boxed usage text. Ctrl-C says that nothing was
    written (every output goes through a temporary path), or which resumable directory a streamed run
    keeps and how to resume or remove it, and exits with 130.
    """
    try:
        _run_app()
    finally:  # leave torchrun's process group, if the command joined one
        api = sys.modules.get("surgeon_export.api")
        if api is not None:
            api.shutdown_distributed()


def _interrupted() -> str:
    api = sys.modules.get("surgeon_export.api")  # no API yet: nothing can have been written
    return api.interrupted_message() if api is not None else NOTHING_WRITTEN


def _run_app() -> None:
    try:  # typer >= 0.2x vendors click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)  # a typer.Exit comes back as its exit code
        if code == INTERRUPTED:  # typer caught a KeyboardInterrupt: every output goes through a temporary path
            typer.echo(_interrupted(), err=True)
        sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode ends
    except NoArgsIsHelpError as exc:  # the command alone: its help, as --help prints it
        typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except UsageError as exc:
        typer.echo(f"error: {exc.format_message().strip().splitlines()[0]}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(_interrupted(), err=True)
        sys.exit(130)
    except FloatingPointError as exc:
        typer.echo(f"error: numerical failure ({exc}); try more damping or other calibration data", err=True)
        sys.exit(2)
    except Exception as exc:
        api = sys.modules.get("surgeon_export.api")  # a SurgeonError comes from the API, so it is imported
        if api is None or not isinstance(exc, api.SurgeonError):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
