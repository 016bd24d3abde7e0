"""The ``surgeon-export`` command line: one command per stage, each building a config and calling
one library function. User mistakes (:class:`SurgeonError`) print one line and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgeon.errors import SurgeonError

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
DataDir = Annotated[
    Optional[Path],
    typer.Option(help="Shared corpora directory (default: $SURGEON_EXPORT_DATA or ../shared/data)."),
]


def _setup(quiet: bool, threads: int | None) -> None:
    import torch

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if quiet else "%(message)s",
        stream=sys.stderr,
    )
    if threads is not None:
        if threads < 1:
            raise SurgeonError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


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
    from benchmarks.env import environment
    from benchmarks.metrics import perplexity
    from surgeon.data import check_window, eval_tokens
    from surgeon.loading import count_parameters, load_model

    _setup(quiet, threads)
    if windows < 1 or batch_size < 1:
        raise SurgeonError("--windows and --batch-size must be at least 1")
    start = time.perf_counter()
    lm = load_model(model)
    check_window(seq_len, lm.model)
    tokens = eval_tokens(lm.tokenizer, text, data_dir)
    result = perplexity(
        lm.model, tokens.ids, seq_len=seq_len, max_windows=None if full else windows,
        batch_size=batch_size, progress=not quiet,
    )
    elapsed = time.perf_counter() - start
    payload = {
        "model": lm.source,
        "text": tokens.origin,
        **result.to_dict(),
        "parameters": count_parameters(lm.model, lm.adapter),
        "seconds": round(elapsed, 2),
        "environment": environment(),
    }
    _emit(payload, as_json, [
        f"perplexity {result.perplexity:.3f}  ({result.windows} windows x {seq_len} tokens, "
        f"{result.tokens} predicted; {Path(tokens.origin).name}; {elapsed:.0f} s)",
        f"model: {lm.source}",
    ])


@app.command("info")
def info_cmd(model: ModelArg = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """Architecture, shapes, parameter counts and measured zeros of a model."""
    from surgeon.loading import count_parameters, load_model

    _setup(quiet, None)
    lm = load_model(model)
    config = lm.model.config
    counts = count_parameters(lm.model, lm.adapter)
    payload = {
        "model": lm.source,
        "path": str(lm.path),
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "parameters": counts,
    }
    zeros = counts["decoder_linear_zeros"] / counts["decoder_linear"]
    _emit(payload, as_json, [
        f"{lm.source}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, {config.num_attention_heads} query / "
        f"{config.num_key_value_heads} KV heads",
        f"parameters {counts['total']:,}; decoder linears {counts['decoder_linear']:,} "
        f"({zeros:.4%} zeros)",
        f"weights: {lm.path}",
    ])


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except SurgeonError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
