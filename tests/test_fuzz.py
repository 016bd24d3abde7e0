"""Seeded fuzzing of what the loaders read: safetensors headers, config.json, GGUF headers, pack manifests and
values, benchmark baselines. Every mutant must give a clean error (SurgeonError, the CLI's one line and exit
code 2) or an identical load; another exception, a hang or changed weights fails.

The library functions run in-process so that a thousand cases take about a minute. Outcomes per kind are
printed (``-s``) and asserted. One exception is by design: a user's safetensors or GGUF file carries no
checksum, so a header edit that re-points a tensor at another valid range of the same size loads other
weights without any way to tell (counted as ``undetectable``, allowed only for those two user formats; our
own packs carry checksums, so there it is a failure).
"""

from __future__ import annotations

import copy
import json
import random
import signal
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from base import loading
from base.errors import SurgeonError
from base.formats import PACK_MANIFEST_FILE, PACK_WEIGHTS_FILE
from base.loading import load_model
from benchmarks.gate import compare, load_baseline
from export.sparse_checkpoint import PackConfig, pack_checkpoint
from runtime.load import load_compressed
from tests.conftest import make_tokenizer, tiny_llama_config
from tests.test_semi_structured import pruned_24_dir

SEED = 0
HANG_SECONDS = 30
ODD_VALUES: list[object] = [0, -1, 1, 2, 3, 7, 1.5, -0.5, 1e30, float("nan"), 2**40, "x", "", None, True, [], {}, [1, 2],
                            {"a": 1}, "float16", "F16", "I64", "BOOL", "U8"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def outcome(case: Callable[[], object], expected: object | None, undetectable_ok: bool = False) -> str:
    """Run one mutant: ``error`` (SurgeonError), ``identical``, ``undetectable`` or a failure description."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        got = case()
    except SurgeonError as exc:
        return "error" if "\n" not in str(exc) else f"multi-line error: {exc!r}"
    except Hang:
        return "hang"
    except Exception as exc:  # the fuzzer's finding
        return f"crash: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
    if expected is None or same(got, expected):
        return "identical"
    return "undetectable" if undetectable_ok else "changed weights"


def same(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.is_meta or b.is_meta:  # a tensor never read
            return False
        return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return a == b


def state_of(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def mutate_json(rng: random.Random, doc: object) -> object:
    """One structural edit somewhere in a JSON document: change, delete or add a value."""
    doc = copy.deepcopy(doc)
    paths: list[tuple[object, object]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k in list(node):
                paths.append((node, k))
                walk(node[k])
        elif isinstance(node, list):
            for i in range(len(node)):
                paths.append((node, i))
                walk(node[i])

    walk(doc)
    if not paths:
        return rng.choice(ODD_VALUES)
    parent, key = rng.choice(paths)
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.25 and isinstance(parent, dict):
        parent[f"extra_{rng.randrange(100)}"] = rng.choice(ODD_VALUES)
    else:
        value = parent[key]  # type: ignore[index]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
            new: object = rng.choice([value + 1, value - 1, value * 2, -value, value // 2 if isinstance(value, int) else value / 2])
        else:
            new = rng.choice(ODD_VALUES)
        parent[key] = new  # type: ignore[index]
    return doc


def flip_bytes(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        i = rng.randrange(lo, min(hi, len(out)))
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 0xFF])
    return bytes(out)


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    header, body = safetensors_parts(data)
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.random()
    if kind < 0.5:
        return with_header(mutate_json(rng, header), body)
    if kind < 0.75:
        return flip_bytes(rng, data, 8, 8 + n)  # raw header bytes
    if kind < 0.85:
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**63, len(data)])) + data[8:]
    return data[: rng.randrange(0, len(data))]  # truncated


def tally(name: str, results: list[str], allowed: set[str]) -> None:
    counts = Counter(r if r in ("error", "identical", "undetectable", "changed weights", "hang") else "crash"
                     for r in results)
    print(f"\nfuzz {name}: {len(results)} mutants: {dict(counts)}")
    bad = [r for r in results if r not in allowed]
    assert not bad, f"{name}: {len(bad)} of {len(results)} mutants failed, e.g. {sorted(set(bad))[:5]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from transformers import LlamaForCausalLM

    tok = make_tokenizer(vocab_size=320)  # real merges, so the GGUF export has a tokenizer to write
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    src = tmp_path_factory.mktemp("fuzz") / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, state_of(load_model(src))


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_fuzz_safetensors_headers(tiny, tmp_path: Path) -> None:
    src, expected = tiny
    rng = random.Random(SEED)
    original = (src / "model.safetensors").read_bytes()
    results = []
    work = copy_dir(src, tmp_path / "m")
    for _ in range(300):
        (work / "model.safetensors").write_bytes(mutate_safetensors(rng, original))
        results.append(outcome(lambda: state_of(load_model(work)), expected, undetectable_ok=True))
    tally("safetensors header", results, {"error", "identical", "undetectable"})


def lazy_state(spec: Path) -> dict[str, torch.Tensor]:
    """Every tensor the streaming loader reads: outside the layers at open, each layer when materialised."""
    from base.lazy import open_lazy

    lazy = open_lazy(spec)
    state = {k: v for k, v in lazy.model.state_dict().items() if not k.startswith(lazy.adapter.layers + ".")}
    for i in range(lazy.num_layers()):
        state.update({lazy.layer_prefix(i) + k: v for k, v in lazy.read_layer(i).state_dict().items()})
    return state


def test_fuzz_config_json(tiny, tmp_path: Path) -> None:
    """config.json through the one loader (150), the streaming loader (50) and a pack's loader (50)."""
    src, expected = tiny
    _, pruned = pruned_24_dir(tmp_path)
    packed = tmp_path / "packed"
    pack_checkpoint(load_model(pruned), packed, PackConfig("2:4"))
    targets = [(src, lambda d: state_of(load_model(d)), expected),
               (src, lazy_state, lazy_state(src)),
               (packed, lambda d: state_of(load_compressed(d).lm), state_of(load_compressed(packed).lm))]
    rng = random.Random(SEED + 1)
    results: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for i in range(250):
        which = 0 if i < 150 else 1 if i < 200 else 2
        source, read, want = targets[which]
        work = copy_dir(source, tmp_path / f"m{which}") if i in (0, 150, 200) else tmp_path / f"m{which}"
        if i % 10 == 9:
            (work / "config.json").write_bytes(flip_bytes(rng, (source / "config.json").read_bytes(), 0, 10**9))
        else:
            config = json.loads((source / "config.json").read_text())
            (work / "config.json").write_text(json.dumps(mutate_json(rng, config)))
        results[which].append(outcome(lambda: read(work), want))
    for which, name in enumerate(("config.json (load_model)", "config.json (open_lazy)", "config.json (pack)")):
        tally(name, results[which], {"error", "identical"})


def test_fuzz_gguf_headers(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from export.gguf import export_gguf

    src, expected = tiny
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    export_gguf(src, gguf, tensor_type="f32")
    original = gguf.read_bytes()
    assert same(state_of(load_model(gguf)), expected)
    data_start = _gguf_tensor_info_start(original)
    rng = random.Random(SEED + 2)
    results = []
    for i in range(100):
        kind = rng.random()
        if kind < 0.7:  # the fixed header and the key/value metadata
            data = flip_bytes(rng, original, 0, data_start)
        elif kind < 0.85:
            data = original[: rng.randrange(0, data_start + 64)]
        else:  # counts: tensors, key/values
            data = original[:8] + struct.pack("<QQ", *(rng.choice([0, 1, 2**40, 2**64 - 1, 5]) for _ in range(2))) + original[24:]
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(data)
        results.append(outcome(lambda: state_of(load_model(path)), expected, undetectable_ok=True))
        path.unlink()
    tally("GGUF header", results, {"error", "identical", "undetectable"})


def _gguf_tensor_info_start(data: bytes) -> int:
    """Offset where the tensor infos begin (after the header and key/value metadata), read with gguf's reader."""
    import tempfile

    import gguf as gg

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        reader = gg.GGUFReader(f.name)
        return min(t.field.offset for t in reader.tensors)


def test_fuzz_pack_manifest_and_values(tmp_path: Path) -> None:
    _, source = pruned_24_dir(tmp_path)
    packed = tmp_path / "packed"
    pack_checkpoint(load_model(source), packed, PackConfig("2:4"))
    cm = load_compressed(packed)
    expected = state_of(cm.lm)
    manifest = json.loads((packed / PACK_MANIFEST_FILE).read_text())
    weights = (packed / PACK_WEIGHTS_FILE).read_bytes()
    work = copy_dir(packed, tmp_path / "w")
    rng = random.Random(SEED + 3)
    results = []
    for i in range(250):
        (work / PACK_MANIFEST_FILE).write_text(json.dumps(manifest))
        (work / PACK_WEIGHTS_FILE).write_bytes(weights)
        kind = rng.random()
        if kind < 0.3:
            (work / PACK_MANIFEST_FILE).write_text(json.dumps(mutate_json(rng, manifest)))
        elif kind < 0.55:
            (work / PACK_WEIGHTS_FILE).write_bytes(mutate_safetensors(rng, weights))
        else:  # values, position metadata, dense tensors: anywhere in the data
            n = struct.unpack("<Q", weights[:8])[0]
            (work / PACK_WEIGHTS_FILE).write_bytes(flip_bytes(rng, weights, 8 + n, len(weights)))
        results.append(outcome(lambda: state_of(load_compressed(work).lm), expected))
    tally("pack manifest and values", results, {"error", "identical"})


def test_fuzz_bench_baselines(tmp_path: Path) -> None:
    doc = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "onnx.json").read_text())
    reference = compare(doc, doc, 0.05)
    rng = random.Random(SEED + 4)
    path = tmp_path / "baseline.json"
    results = []
    for i in range(200):
        if i % 10 == 9:
            path.write_bytes(flip_bytes(rng, json.dumps(doc).encode(), 0, 10**9))
        else:
            mutant = doc
            for _ in range(rng.choice([1, 1, 2, 3])):
                mutant = mutate_json(rng, mutant)
            path.write_text(json.dumps(mutant))
        results.append(outcome(lambda: compare(doc, load_baseline(path), 0.05)["passed"], None))
    assert reference["passed"]
    tally("bench baseline", results, {"error", "identical"})
