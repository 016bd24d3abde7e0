"""Streamed pruning's writing side: each decoder layer is read from disk, pruned, and written as its own shard.

:class:`StreamedLayers` is the :class:`surgeon.driver.LayerStream` of a model opened with
:func:`base.lazy.open_lazy`: the driver asks for layer ``i`` (read from the memory-mapped source),
prunes it, and hands it back; it is written at once to ``model-{i+1:05d}-of-{N:05d}.safetensors`` in a
hidden sibling of the target (``.NAME.partial``) and freed. What lies outside the decoder layers
(embeddings, final norm, untied LM head) goes to the last shard. :meth:`StreamedLayers.finish`
writes the index, config, tokenizer and report (zeros counted in the written files) and renames
the directory into place, so ``--out`` never holds a half-written checkpoint.

Resume: ``progress.json`` in the partial directory (a :class:`base.resume.ResumeState`) records the
source's identity (config, every safetensors header and size, and a digest of each file's first and
last MiB), the pruning settings, each finished layer's records and its shard's checksum. A rerun
with the same source and settings reads the finished layers back from their shards, replays them to
rebuild the next layer's inputs, and goes on from the first unfinished layer, so an interrupted run
ends with the same tensors as an uninterrupted one. Other settings or another source: a one-line
error naming the difference.

Streamed LLM Surgeon (:mod:`surgeon.streamed_surgeon`) walks the layers several times per shot and
keeps its files and resume state in ``surgeon/`` inside the partial directory; it hands each layer
to :meth:`StreamedLayers.leave` once, with its final weights, after the last shot.

Data-parallel (``torchrun``, :mod:`base.distributed`): every rank streams the layers from its own
copy of the source and prunes them with the others (the driver shares a layer's work); rank 0 alone
writes shards and progress, and on a resume sends the finished layers to the other ranks.

The shards keep the source checkpoint's floating dtype (float32 for the default model, bfloat16 for
a bfloat16 source); the pruning itself runs in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from base.distributed import broadcast_from, broadcast_json
from base.env import trim_heap
from base.files import install_dir, is_write_error, write_error, write_file
from base.formats import REPORT_FILE
from base.integrity import source_identity as checkpoint_identity
from base.lazy import LazyModel
from base.loading import tied_keys
from base.resume import ResumeState
from export.card import write_card
from export.checkpoint import REPORT_VERSION, prepare_target, saved_accounting
from export.portable import make_portable

PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 2  # 2: base.resume (the shards' checksums)
INDEX_FILE = "model.safetensors.index.json"


def source_identity(lazy: LazyModel) -> str:
    """The identity of the source checkpoint (:func:`base.integrity.source_identity`)."""
    return checkpoint_identity(lazy.path / "config.json", lazy.weights.where.values())


def partial_dir(out: Path) -> Path:
    """The hidden sibling of ``out`` a streamed run writes (and resumes) in before it is renamed into place."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.partial"


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class StreamedLayers:
    """Read each layer from the source, write it when pruned; resumable (see the module docstring)."""

    def __init__(self, lazy: LazyModel, out: Path, settings: dict, *, force: bool = False, writer: bool = True) -> None:
        """``writer``: this process writes the checkpoint. The other ranks of a data-parallel run
        (``writer=False``) read the same source and prune alike, write nothing, and take the layers an
        earlier run finished from rank 0."""
        self.lazy, self.out = lazy, Path(out).expanduser()
        if writer:
            prepare_target(self.out, force)
        self.force = force
        self.num_layers = lazy.num_layers()
        self.total = self.num_layers + 1  # one shard per layer, one for the rest
        self.dtype = lazy.weights.dtype()  # shards keep the source's dtype
        self.partial = partial_dir(self.out)
        self.layers: dict[int, dict] = {}  # the finished layers' records
        self.state: ResumeState | None = None
        if writer:  # bound to the source's identity and the settings; the shards are its pieces
            self.state = ResumeState.open(self.partial, PROGRESS_FILE, PROGRESS_VERSION,
                                          {"source model": source_identity(lazy), **settings},
                                          pieces="model-*.safetensors", target=self.out)
            if self.state.resumed:
                self.layers = {int(k): v for k, v in self.state.data["layers"].items()}
            else:
                self.state.save(layers={})
        finished = broadcast_json(0, {str(k): v for k, v in self.layers.items()})  # rank 0's, to all
        self.layers = {int(k): v for k, v in finished.items()}

    # -- surgeon.driver.LayerStream --
    def enter(self, index: int) -> nn.Module:
        if index in self.layers:  # pruned by an earlier run: read it back from its shard
            import copy

            layer = copy.deepcopy(self.lazy.adapter.decoder_layers(self.lazy.model)[index])
            prefix = self.lazy.layer_prefix(index)
            if self.state is not None:
                saved = self.state.tensors(shard_name(index, self.total))
                state = {k.removeprefix(prefix): v.to(self.lazy.dtype).contiguous() for k, v in saved.items()}
            else:  # another rank of a data-parallel run: rank 0 sends the layer
                state = {k: torch.empty(v.shape, dtype=self.lazy.dtype) for k, v in layer.state_dict().items()}
            state = dict(sorted(state.items()))
            broadcast_from(0, list(state.values()))
            layer.load_state_dict(state, assign=True, strict=True)
            self.lazy.adapter.decoder_layers(self.lazy.model)[index] = layer
            return layer.eval()
        return self.lazy.materialise(index)

    def dense(self, index: int) -> nn.Module:
        return self.lazy.read_layer(index)

    def finished(self, index: int) -> dict | None:
        return self.layers.get(index)

    def leave(self, index: int, layer: nn.Module, records: dict | None) -> None:
        if records is not None:
            self.layers[index] = records
            if self.state is not None:
                prefix = self.lazy.layer_prefix(index)
                self.state.put_tensors(shard_name(index, self.total),
                                       {prefix + k: v.to(self.dtype) for k, v in layer.state_dict().items()})
                self.state.save(layers={str(k): v for k, v in self.layers.items()})
        self.lazy.release(index)

    def captured(self) -> None:
        self.lazy.release_embeddings()

    # -- the end --
    def finish(self, report: dict) -> dict:
        """Write the rest shard, index, config, tokenizer and report, then move the checkpoint into place
        (another rank of a data-parallel run writes nothing and gets the report)."""
        if self.state is None:
            return {**report, "streamed": True}
        try:
            return self._finish(report)
        except Exception as exc:  # a failed write is one line; the finished layers stay for the resume
            if is_write_error(exc):
                raise write_error(exc, self.out) from None
            raise

    def _finish(self, report: dict) -> dict:
        model: Any = self.lazy.model
        if len(self.layers) != self.num_layers:
            raise RuntimeError("finish() before every layer was written")
        tied = tied_keys(model)
        layers = self.lazy.adapter.layers + "."
        # The walk is over: the float32 embeddings and LM head go before their copies are read (held beside
        # them, a 262k x 640 embedding was 0.67 GB of the end's peak).
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to("meta")
        trim_heap()
        # What lies outside the layers is never pruned: copied from the source (an untied LM head the
        # layer-wise methods left on disk included), in the source's dtype as every shard.
        rest = {k: self.lazy.weights.get(k, self.dtype).contiguous() for k in model.state_dict()
                if not k.startswith(layers) and k not in tied}
        write_file(self.partial / shard_name(self.num_layers, self.total), lambda path: save_file(rest, str(path)),
                   target=self.out)
        weight_map = {}
        for i in range(self.total):
            name = shard_name(i, self.total)
            with open(self.partial / name, "rb") as f:  # names from the header: nothing is read twice
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            weight_map.update({k: name for k in header if k != "__metadata__"})
        size = sum((self.partial / shard_name(i, self.total)).stat().st_size for i in range(self.total))
        (self.partial / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                           "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config = model.config
        config.dtype = self.dtype
        config.save_pretrained(self.partial)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.partial)
        self.lazy.tokenizer.save_pretrained(self.partial)
        linears = list(self.lazy.adapter.decoder_linears(model))
        numel = sum(r["numel"] for done in self.layers.values() for r in done["layers"].values())
        report = {**report, "streamed": True, "format_version": REPORT_VERSION,
                  **saved_accounting(self.partial, linears, numel)}
        (self.partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
        make_portable(self.partial)
        write_card(self.partial, title=f"{self.out.name}: a pruned model, written one decoder layer at a time",
                   source=report.get("model"), report=report, source_dir=self.lazy.path, tags=["streaming"],
                   usage=["Same architecture and shapes as the source; the pruned weights are zeros (sharded "
                          "safetensors with an index)."])
        (self.partial / PROGRESS_FILE).unlink()
        prepare_target(self.out, self.force)
        install_dir(self.partial, self.out)
        return report
