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

import typer  # noqa: E402

from surgeon_export import options as o  # noqa: E402

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
    model: o.ModelArg = None, text: o.EvalText = None, data_dir: o.DataDir = None, seq_len: o.EvalSeqLen = 512,
    windows: o.EvalWindows = 64, full: o.EvalFull = False, batch_size: o.EvalBatchSize = 4, threads: o.Threads = None,
    quiet: o.Quiet = False, as_json: o.AsJson = False,
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


@app.command("prune")
def prune_cmd(
    model: o.ModelArg = None, out: o.PruneOut = None, method: o.Method = "sparsegpt", sparsity: o.Sparsity = None,
    pattern: o.Pattern = None, structured: o.Structured = None, calib_samples: o.CalibSamples = None,
    shots: o.Shots = 3, kfac_samples: o.KfacSamples = None, kfac_batch: o.KfacBatch = 4, calib_batch: o.CalibBatch = 8,
    allocation: o.Allocation = None, correlation: o.Correlation = "joint", group_cost: o.GroupCost = "output",
    fisher: o.Fisher = "empirical", checkpoint: o.Checkpoint = None, seq_len: o.SeqLen = 512,
    calib_text: o.CalibText = None, seed: o.Seed = 0, true_sequential: o.TrueSequential = False,
    refine: o.Refine = None, sds_l1: o.SdsL1 = None, sds_l2: o.SdsL2 = None, sds_epochs: o.SdsEpochs = None,
    sds_adjust_epochs: o.SdsAdjustEpochs = None, sds_teacher: o.SdsTeacher = None, align: o.Align = 1,
    evaluate: o.Evaluate = True, streaming: o.Streaming = None, max_memory: o.MaxMemory = None,
    bos_statistics: o.BosStatistics = "include", check_streaming: o.CheckStreaming = None, recover: o.Recover = False,
    recover_steps: o.RecoverSteps = o.RECOVER_STEPS, recover_lr: o.RecoverLr = None, recover_rank: o.RecoverRank = 0,
    recover_data: o.RecoverData = "calibration", recover_windows: o.RecoverWindows = 256,
    recover_seq_len: o.RecoverSeqLen = 256, lora_between_shots: o.LoraBetweenShots = 0, data_dir: o.DataDir = None,
    force: o.Force = False, dist_timeout: o.DistTimeout = 600.0, threads: o.Threads = None, quiet: o.Quiet = False,
    as_json: o.AsJson = False,
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
    model: o.ModelArg = None, out: o.ShrinkOut = None, align: o.ShrinkAlign = 1, rounding: o.ShrinkRounding = "up",
    uniform: o.ShrinkUniform = False, layout: o.ShrinkLayout = "default", force: o.Force = False,
    quiet: o.Quiet = False, as_json: o.AsJson = False,
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
    model: o.ModelArg = None, out: o.RunOut = Path("surgeon-out"), structured: o.RunStructured = 0.8,
    method: o.RunMethod = "surgeon", allocation: o.RunAllocation = "uniform", shots: o.RunShots = 2,
    calib_samples: o.RunCalibSamples = 16, align: o.Align = 8, ppl_windows: o.RunPplWindows = 64,
    seq_len: o.RunSeqLen = 512, text: o.RunText = None, data_dir: o.DataDir = None, onnx: o.RunOnnx = True, runtimes: o.RunRuntimes = True,
    openvino: o.RunOpenvino = False, recover: o.Recover = False, recover_steps: o.RecoverSteps = o.RECOVER_STEPS,
    recover_lr: o.RecoverLr = None, recover_rank: o.RecoverRank = 0, recover_data: o.RecoverData = "calibration",
    recover_windows: o.RecoverWindows = 256, recover_seq_len: o.RecoverSeqLen = 256, force: o.Force = False,
    threads: o.Threads = None, quiet: o.Quiet = False, as_json: o.AsJson = False,
) -> None:
    """The main job: structured pruning, write the physically smaller model, export it to ONNX, benchmark dense vs pruned."""
    _setup(quiet, threads)
    api = _api()
    api.check_choice("--allocation", allocation, ("uniform", "global"))
    payload = api.run(api.RunConfig(
        model=model, out=out, structured=structured, method=method, allocation=allocation, shots=shots,
        calib_samples=calib_samples, align=align, ppl_windows=ppl_windows, seq_len=seq_len, text=text,
        data_dir=data_dir, onnx=onnx, runtimes=runtimes, openvino=openvino, progress=not quiet, force=force,
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
    model: o.ModelArg = None, out: o.PackOut = None, layout: o.PackLayout = "2:4", dtype: o.PackDtype = None,
    blocksize: o.PackBlocksize = "4x4", force: o.Force = False, quiet: o.Quiet = False, as_json: o.AsJson = False,
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
    directory: o.DensifyDirectory, out: o.DensifyOut = None, force: o.Force = False, quiet: o.Quiet = False,
    as_json: o.AsJson = False,
) -> None:
    """Write a compressed checkpoint back as a normal dense one that plain transformers loads."""
    _setup(quiet, None)
    out = _target(out, "the dense checkpoint", force, directory)
    result = _api().densify(directory, out, force=force)
    _emit(result, as_json, [f"wrote a dense checkpoint ({result['tensors']} tensors, "
                            f"{result['bytes_on_disk']:,} bytes) to {out}"])


@app.command("onnx")
def onnx_cmd(
    model: o.ModelArg = None, out: o.OnnxOut = None, dtype: o.OnnxDtype = "float32", opset: o.OnnxOpset = 17,
    external_data: o.OnnxExternalData = "auto", simplify: o.OnnxSimplify = True, optimize: o.OnnxOptimize = False,
    verify: o.OnnxVerify = True, uniform_cache: o.OnnxUniformCache = False, force: o.Force = False,
    threads: o.Threads = None, quiet: o.Quiet = False, as_json: o.AsJson = False,
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
    model: o.ModelArg = None, out: o.GgufOut = None, tensor_type: o.GgufTensorType = "f16",
    uniform: o.GgufUniform = False, force: o.GgufForce = False, ffn_align: o.GgufFfnAlign = 32, quiet: o.Quiet = False,
    as_json: o.AsJson = False,
) -> None:
    """Export a model to one GGUF file for llama.cpp (Llama and Gemma families; per-layer Llama/Qwen2 shapes as llama.cpp's 'deci'; docs/gguf.md)."""
    _setup(quiet, None)
    out = _target(out, "the GGUF export", force, kind="FILE.gguf")
    m = _api().export_gguf(model, out, tensor_type=tensor_type, uniform=uniform, force=force, ffn_align=ffn_align)
    _emit(m, as_json, [f"wrote {out}: llama.cpp '{m['architecture']}', {m['tensor_type']}, {len(m['layers'])} layers, "
                       f"{m['tensor_count']} tensors, {m['bytes'] / 2**20:.1f} MiB"])


@app.command("generate")
def generate_cmd(
    model: o.GenerateModel = "default", prompt: o.GeneratePrompt = None, backend: o.GenerateBackend = "torch",
    device: o.GenerateDevice = "cpu", max_new_tokens: o.GenerateMaxNewTokens = 32, sample: o.GenerateSample = False,
    temperature: o.GenerateTemperature = 1.0, top_k: o.GenerateTopK = 0, top_p: o.GenerateTopP = 1.0,
    seed: o.GenerateSeed = 0, stop: o.GenerateStop = None, chat: o.GenerateChat = False, threads: o.Threads = None,
    quiet: o.Quiet = False, as_json: o.AsJson = False,
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
    target: o.VllmSetupTarget = None, quiet: o.Quiet = False,
) -> None:
    """Create vLLM's own environment (vLLM CPU build, this package, pins vLLM accepts) for --backend vllm."""
    _setup(quiet, None)
    typer.echo(f"vLLM environment ready: {_api().setup_vllm(target, quiet=quiet)}")


@app.command("info")
def info_cmd(
    model: o.ModelArg = None, quiet: o.Quiet = False, as_json: o.AsJson = False,
) -> None:
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
    models: o.BenchModels = None, backend: o.BenchBackend = None, device: o.BenchDevice = "auto",
    dtype: o.BenchDtype = "auto", prefill: o.BenchPrefill = "1x128,8x512", decode: o.BenchDecode = "1,8",
    new_tokens: o.BenchNewTokens = 128, prompt_len: o.BenchPromptLen = 128, repeat: o.BenchRepeat = 5,
    warmup: o.BenchWarmup = 1, seed: o.BenchSeed = 0, ppl_windows: o.BenchPplWindows = 64,
    ppl_seq_len: o.BenchPplSeqLen = 512, no_ppl: o.BenchNoPpl = False, text: o.BenchText = None,
    data_dir: o.DataDir = None, isolation: o.BenchIsolation = "process", out: o.BenchOut = Path("benchmark.json"),
    baseline: o.BenchBaseline = None, max_regression: o.BenchMaxRegression = "5%", force: o.BenchForce = False,
    threads: o.Threads = None, quiet: o.Quiet = False, as_json: o.AsJson = False,
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
