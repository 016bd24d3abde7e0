"""The ``vllm`` backend: a model directory served by vLLM's engine (CPU build here, CUDA build on a GPU).

vLLM runs its own scheduler, paged KV cache and batching, so this backend does not step a cache
token by token as the others do: it hands whole requests to one in-process engine (``vllm.LLM``,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and steps the engine itself (``LLMEngine.step``), which gives
every request's time to first token:

- ``generate`` (:meth:`VllmBackend.generate`, which :func:`runtime.generate.generate` hands the
  prompts to): greedy (temperature 0) or sampling with temperature, top-k, top-p, stop tokens and
  the seed, all rows submitted at once; prefill time is until every row has its first token, decode
  time the rest. Greedy tokens are the argmax of the same logits as every backend; sampled tokens
  come from vLLM's own sampler (its own random stream), so they are not the torch loop's draws.
- ``forward`` (the Backend protocol, used for prefill timing and checks): the sequences so far as
  one request of one token, returning full-vocabulary log-probabilities (vLLM's raw log-probs:
  the logits minus each position's log-sum-exp, so softmax, argmax and cross-entropy are those of
  the logits). Prefix caching is off, so a repeated prompt is computed again, as in every other
  backend's timing.
- ``token_logprobs`` (perplexity): vLLM's prompt log-probabilities of each window's own tokens
  (``prompt_logprobs=0``), so no vocabulary-sized tensor leaves the engine.
- :func:`throughput`: what vLLM exists for, N concurrent requests: generated tokens/s and time to
  first token (``benchmarks/vllm_throughput.py`` records it for dense and pruned models).

Per-layer-shape checkpoints (``surgeon_llama``, ``surgeon_mistral``) load through our vLLM plugin
(:mod:`runtime.vllm_plugin`, an entry point), uniform ones as vLLM's stock architectures.

It runs in vLLM's own environment (:mod:`runtime.vllm_env`: vLLM's pins differ from the project's).

CPU settings: threads are ``--threads`` (torch's), with vLLM's own core binding off
(``VLLM_CPU_OMP_THREADS_BIND=nobind``: the machine is shared); the KV cache gets room for
:data:`KV_TOKENS` tokens (vLLM's CPU default takes most of the machine's memory); eager mode (no
``torch.compile``: start-up stays in seconds).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import dtype_name
from base.loading import load_tokenizer, resolve_model_dir, weight_files
from export.flops import flops_table
from runtime.backend import hf_config, pruning_config, resolve_dtype
from runtime.generate import Generation, GenerationConfig
from runtime.vllm_env import VLLM_VERSION, backend_python, env_dir, vllm_importable

KV_TOKENS = 16384  # KV cache room: 32 concurrent requests of 512 tokens
MAX_MODEL_LEN = 2048  # longest request (prompt + new tokens); capped by the model's context


@dataclass
class Request:
    """One finished request: its generated tokens and when its first token came (seconds after submission)."""

    tokens: list[int]
    first_token_seconds: float
    stopped: bool
    prompt_logprobs: Any = None
    logprobs: Any = None


class VllmBackend:
    """:class:`runtime.backend.Backend` over one in-process vLLM engine."""

    name = "vllm"

    def __init__(self, directory: Path, source: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_model_len: int = MAX_MODEL_LEN) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # --threads, no core pinning
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records go to our log (stderr), not stdout
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # its start-up warnings (Triton, tcmalloc) are noise here
            logging.getLogger("vllm").setLevel(logging.ERROR)
        from vllm import LLM

        self.directory, self.source = directory, source
        self.device = torch.device(device)
        self.config: Any = hf_config(directory)
        self.tokenizer = load_tokenizer(directory)
        self.vocab_size = int(self.config.vocab_size)
        self.dtype = dtype
        context = getattr(self.config, "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(int(context), max_model_len)
        start = time.perf_counter()
        try:
            self.llm = LLM(model=str(directory), dtype=dtype, max_model_len=self.max_model_len, seed=0,
                           enforce_eager=True, enable_prefix_caching=False, max_logprobs=-1,
                           kv_cache_memory_bytes=max(KV_TOKENS, self.max_model_len) * kv_bytes_per_token(self.config, dtype),
                           disable_log_stats=True)
        except (ValueError, RuntimeError) as exc:  # vLLM's own refusals (an architecture, a head size)
            raise SurgeonError(f"vLLM cannot serve {directory}: {_reason(exc)}") from None
        self.startup_seconds = time.perf_counter() - start
        self.engine = self.llm.llm_engine
        self.rows: list[list[int]] = []
        self._ids = 0

    # -- requests ----------------------------------------------------------------------------------
    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> list[Request]:
        """Submit every prompt at once and step the engine until all are done (greedy or sampled)."""
        ids = []
        start = time.perf_counter()
        for prompt, p in zip(prompts, params):
            self._ids += 1
            ids.append(str(self._ids))
            self.engine.add_request(ids[-1], {"prompt_token_ids": list(prompt)}, p)
        first: dict[str, float] = {}
        done: dict[str, Any] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = time.perf_counter() - start
                if out.finished:
                    done[out.request_id] = out
        results = []
        for rid in ids:
            out = done[rid].outputs[0]
            results.append(Request(list(out.token_ids), first[rid], out.finish_reason == "stop",
                                   done[rid].prompt_logprobs, out.logprobs))
        return results

    def params(self, cfg: GenerationConfig, **extra: Any) -> Any:
        """vLLM's sampling parameters for a generation config (raw log-probs, no detokenising)."""
        from vllm import SamplingParams

        sample = dict(temperature=cfg.temperature, top_k=cfg.top_k or -1, top_p=cfg.top_p, seed=cfg.seed) \
            if cfg.do_sample else dict(temperature=0.0)
        return SamplingParams(max_tokens=cfg.max_new_tokens, stop_token_ids=list(cfg.stop_tokens), ignore_eos=True,
                              detokenize=False, flat_logprobs=True, **sample, **extra)

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> Generation:
        """Every prompt continued by vLLM's scheduler; the rows of a batch are concurrent requests."""
        start = time.perf_counter()
        results = self.run(prompts, [self.params(cfg)] * len(prompts))
        total = time.perf_counter() - start
        prefill = max(r.first_token_seconds for r in results)
        return Generation([r.tokens for r in results], [r.stopped for r in results], prefill, total - prefill,
                          steps=max(len(r.tokens) for r in results) - 1)

    # -- the Backend protocol ------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.rows = [[] for _ in range(batch_size)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        """Log-probabilities ``[B, T or 1, V]`` after the new tokens (padding, mask 0, is dropped)."""
        new = attention_mask[:, -input_ids.shape[1]:].bool()  # [B, T]
        for row, ids, keep in zip(self.rows, input_ids.tolist(), new.tolist()):
            row.extend(t for t, k in zip(ids, keep) if k)
        cfg = GenerationConfig(max_new_tokens=1)
        if last_only:
            results = self.run(self.rows, [self.params(cfg, logprobs=-1)] * len(self.rows))
            return torch.stack([self._dense(r.logprobs, 0) for r in results])[:, None]  # [B, 1, V]
        if any(len(row) != input_ids.shape[1] for row in self.rows):
            raise SurgeonError("backend vllm gives every position's log-probabilities only for a first, unpadded pass")
        results = self.run(self.rows, [self.params(cfg, logprobs=-1, prompt_logprobs=-1)] * len(self.rows))
        out = []
        for r in results:  # position i's prompt log-probs predict token i; the last position is the sample's
            out.append(torch.stack([self._dense(r.prompt_logprobs, i) for i in range(1, input_ids.shape[1])]
                                   + [self._dense(r.logprobs, 0)]))
        return torch.stack(out)  # [B, T, V]

    def _dense(self, flat: Any, position: int) -> Tensor:
        """One position of vLLM's flat log-probs as a dense ``[V]`` float32 vector."""
        lo, hi = flat.start_indices[position], flat.end_indices[position]
        out = torch.full((self.vocab_size,), float("-inf"))
        out[torch.tensor(flat.token_ids[lo:hi])] = torch.tensor(flat.logprobs[lo:hi], dtype=torch.float32)
        return out

    def logits(self, input_ids: Tensor) -> Tensor:
        """Log-probabilities ``[B, T, V]`` of whole windows (softmax and cross-entropy as of the logits)."""
        self.reset(input_ids.shape[0])
        return self.forward(input_ids, torch.ones_like(input_ids), torch.arange(input_ids.shape[1]).expand_as(input_ids))

    def token_logprobs(self, input_ids: Tensor) -> Tensor:
        """Log-probability of each window token after the ones before it: ``[B, T - 1]`` float64,
        from vLLM's prompt log-probs (perplexity without vocabulary-sized tensors)."""
        cfg = GenerationConfig(max_new_tokens=1)
        results = self.run(input_ids.tolist(), [self.params(cfg, prompt_logprobs=0)] * input_ids.shape[0])
        out = torch.empty(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
        for b, (r, ids) in enumerate(zip(results, input_ids.tolist())):
            flat = r.prompt_logprobs
            for i in range(1, len(ids)):  # the actual token's entry is always among position i's
                lo, hi = flat.start_indices[i], flat.end_indices[i]
                out[b, i - 1] = flat.logprobs[lo + flat.token_ids[lo:hi].index(ids[i])]
        return out

    def describe(self) -> dict:
        counts = count_weights(self.directory)
        return {
            "source": self.source,
            "path": str(self.directory),
            "bytes_on_disk": sum(f.stat().st_size for f in weight_files(self.directory)),
            "weight_bytes": counts["total"] * torch.tensor([], dtype=self.dtype).element_size(),
            "parameters": counts,
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"],
            "pruning": pruning_config(self.directory),
            "dtype": dtype_name(self.dtype),
            "flops_per_token": flops_table(self.config),
            "vllm": {"version": VLLM_VERSION, "architecture": (self.config.architectures or ["?"])[0],
                     "startup_seconds": round(self.startup_seconds, 2), "max_model_len": self.max_model_len,
                     "kv_cache_tokens": max(KV_TOKENS, self.max_model_len), "threads": torch.get_num_threads()},
        }


def _reason(exc: Exception) -> str:
    """The line of a vLLM error that says why (pydantic wraps it between its own lines)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    why = next((line for line in lines if line.startswith("Value error, ")), lines[-1] if lines else type(exc).__name__)
    return why.removeprefix("Value error, ").split(" [type=")[0]


DECODER_LINEAR = re.compile(r".*\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def count_weights(directory: Path) -> dict[str, int]:
    """Parameters and zeros of a checkpoint's stored tensors (vLLM's CPU build repacks its linears
    into its own kernels' layout, so they are counted in the files it loads)."""
    from safetensors import safe_open

    counts = dict.fromkeys(("total", "decoder_linear", "decoder_linear_zeros", "total_zeros"), 0)
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                zeros = int((t == 0).sum())
                counts["total"] += t.numel()
                counts["total_zeros"] += zeros
                if DECODER_LINEAR.fullmatch(name):
                    counts["decoder_linear"] += t.numel()
                    counts["decoder_linear_zeros"] += zeros
    return counts


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes over all layers (per-layer KV heads where given)."""
    adapter = get_adapter(str(config.model_type))
    kv = sum(s.num_key_value_heads for s in adapter.config_shapes(config))
    return 2 * kv * adapter.head_dim(config) * torch.tensor([], dtype=dtype).element_size()


@dataclass
class Throughput:
    """N concurrent requests of the same length on one engine."""

    concurrency: int
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time from submission to the last token
    tokens_per_second: float  # generated tokens of all requests / seconds
    ttft_median: float  # time to first token, median over the requests (seconds)
    ttft_max: float


def throughput(backend: VllmBackend, prompts: Tensor, new_tokens: int) -> Throughput:
    """Generate ``new_tokens`` greedy tokens for every row of ``prompts`` ``[N, T]`` as N concurrent
    requests (no stop token), timed from submission."""
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    results = backend.run(prompts.tolist(), [backend.params(cfg)] * prompts.shape[0])
    seconds = time.perf_counter() - start
    firsts = sorted(r.first_token_seconds for r in results)
    generated = sum(len(r.tokens) for r in results)
    return Throughput(prompts.shape[0], prompts.shape[1], new_tokens, seconds, generated / seconds,
                      firsts[len(firsts) // 2], firsts[-1])


def load_vllm(spec: str | None, device: str, dtype: str, threads: int | None) -> VllmBackend:
    """The ``vllm`` backend: a model directory or the default model, float32 on CPU unless ``dtype``."""
    if not vllm_importable():
        backend_python()  # says how to create vLLM's environment when there is none
        raise SurgeonError("backend vllm runs in vLLM's own environment: `bench` and `generate` use it by "
                           f"themselves; from Python, run with {env_dir() / 'bin' / 'python'}")
    directory, source = resolve_model_dir(spec)
    return VllmBackend(directory, source, device, resolve_dtype(dtype, device))
