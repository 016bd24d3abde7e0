"""Fold the traced graph's shape arithmetic into constant ``Reshape``/``Expand`` shapes (standard ops only).

The TorchScript tracer records every ``x.view(b, t, -1, d)`` with dynamic ``b, t`` as a chain
``Shape -> Gather -> Unsqueeze -> Concat`` feeding the ``Reshape``, and every ``expand`` (GQA's
``repeat_kv``) with a further ``Equal``/``Where``; in SmolLM2's graph about half of the ~2,900 nodes
ONNX Runtime executes per decode step are such plumbing, each costing a kernel launch.

With symbolic shapes (onnxruntime's ``SymbolicShapeInference``, dims named ``batch_size``,
``sequence_length``, ...) most of them are constants in ONNX's own terms:

- ``Reshape(X)`` to ``O``: dim ``k`` is ``0`` (copy ``X``'s dim ``k``) when ``O[k]`` is the same
  symbol as ``X[k]``, the number when it is static, and ``-1`` for at most one other dim;
- ``Expand(X)`` to ``O`` (right-aligned): ``1`` (keep ``X``'s dim) when the symbols agree, else the
  static size; nodes with any other dim are left alone.

- ``Gather(Shape(X), i)`` where ``X``'s dim ``i`` is static (``rotate_half``'s ``x.shape[-1] // 2``)
  becomes a constant, which ONNX Runtime then folds onwards when it loads the graph.

The shape subgraphs that no longer feed anything are removed. The export's verification then runs
on the simplified graph, so a wrong fold is never kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Dim = int | str | None
BIG_BYTES = 1 << 16  # initializers above this are weights: shape inference sees only their shapes


def initializer_nbytes(tensor: Any) -> int:
    """Bytes of an initializer's data, from its dims and type (without reading the data)."""
    from onnx import helper

    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _dims(value: Any) -> list[Dim]:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in value.type.tensor_type.shape.dim]


def _infer(proto: Any) -> dict[str, list[Dim]]:
    """Symbolic shape of every tensor, inferred on a copy whose large weights are bare graph inputs."""
    from onnx import helper, numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = proto.graph
    small = [t for t in graph.initializer if initializer_nbytes(t) <= BIG_BYTES]
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in graph.initializer if initializer_nbytes(t) > BIG_BYTES]
    light = helper.make_model(helper.make_graph(list(graph.node), graph.name, [*graph.input, *weights],
                                               list(graph.output), initializer=small),
                              opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    inferred = SymbolicShapeInference.infer_shapes(light, auto_merge=True)
    shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    shapes.update({t.name: list(numpy_helper.to_array(t).shape) for t in small})
    return shapes


def _reshape_target(src: list[Dim], out: list[Dim]) -> list[int] | None:
    target: list[int] = []
    for k, dim in enumerate(out):
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        elif isinstance(dim, str) and k < len(src) and src[k] == dim:
            target.append(0)  # Reshape: 0 copies the input's dim k
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def _expand_target(src: list[Dim], out: list[Dim]) -> list[int] | None:
    offset = len(out) - len(src)
    target: list[int] = []
    for k, dim in enumerate(out):
        j = k - offset
        if j >= 0 and isinstance(dim, str) and src[j] == dim:
            target.append(1)  # Expand: 1 keeps the input's dim
        elif isinstance(dim, int) and dim > 0:
            target.append(dim)
        else:
            return None
    return target


def fold_shapes(proto: Any) -> dict[str, int]:
    """Give ``Reshape``/``Expand`` nodes constant shapes where symbolic shapes allow; prune dead nodes.

    Returns counts: nodes before and after, shapes folded. Modifies ``proto`` in place.
    """
    from onnx import numpy_helper

    graph = proto.graph
    before = len(graph.node)
    constant = {t.name for t in graph.initializer}
    shapes = _infer(proto)
    folded = _fold_static_dims(graph, shapes, constant)
    for node in graph.node:
        if node.op_type not in ("Reshape", "Expand") or node.input[1] in constant:
            continue
        src, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if src is None or out is None or None in out:
            continue
        target = (_reshape_target if node.op_type == "Reshape" else _expand_target)(src, out)
        if target is None:
            continue
        name = f"{node.output[0]}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        constant.add(name)
        node.input[1] = name
        folded += 1
    _prune(graph)
    return {"nodes_before": before, "nodes_after": len(graph.node), "shapes_folded": folded}


def _fold_static_dims(graph: Any, shapes: dict[str, list[Dim]], constant: set[str]) -> int:
    """Replace ``Gather(Shape(X), const)`` of static dims by initializers; returns how many."""
    from onnx import numpy_helper

    shape_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Shape" and not n.attribute}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in constant and len(t.dims) <= 1}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    folded = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in shape_of or node.input[1] not in values:
            continue
        dims = shapes.get(shape_of[node.input[0]])
        index = values[node.input[1]]
        picked = [dims[int(i)] for i in np.atleast_1d(index)] if dims else [None]
        if not all(isinstance(d, int) and d > 0 for d in picked):
            continue
        array = np.array(picked, dtype=np.int64).reshape(index.shape)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        constant.add(node.output[0])
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def _prune(graph: Any) -> None:
    """Remove nodes (and initializers) whose outputs nothing reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
