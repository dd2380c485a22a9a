"""A TensorRT plugin for every registered op, generated from the op's own definition.

For each :class:`~seqdeploy.ops.CustomOp` this module makes an ``IPluginV3`` (with the
``IPluginV3One{Core,Build,Runtime}`` capabilities) and its ``IPluginCreatorV3One``, named like
the ONNX node (``op.onnx_name``), namespace ``seqdeploy``, version ``1``. Nothing here names
an op: everything comes from the op's ONNX schema and its torch op.

- **dtypes per position** (:func:`io_positions`): a position typed by the schema's type
  parameter (``T``) takes fp32 in fp32 graphs and fp16 in fp16 graphs, the same at every
  ``T`` position of one node; a position the schema pins (``tensor(float)``, e.g. decays kept
  fp32 in fp16 graphs, or ``tensor(int64)``) takes exactly that. ``supports_format_combination``
  accepts exactly these (TensorRT-RTX corrupts its heap when a plugin accepts nothing, so the
  sets are never empty).
- **output shapes** come from the exported graph itself (:func:`graph_shape_rules`): each
  output axis is a constant or an axis of an input carrying the same symbolic dimension, so
  an op needs no shape code; only a node without shape information falls back to "like the
  first input of the same type".
- **enqueue** (:func:`run_op`): wraps TensorRT's raw device pointers as torch tensors (through
  ``__cuda_array_interface__``; no CUDA binding package needed), makes TensorRT's stream
  torch's current stream, calls ``op.torch_op`` (the op's CUDA kernel) and copies its results
  into TensorRT's output buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from seqdeploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION, plugin_attributes

if TYPE_CHECKING:
    from seqdeploy.ops import CustomOp
    from seqdeploy.trt.adapter import TensorRT

#: element types seqdeploy's graphs use at a type-parameter position: fp32 graphs, fp16 graphs
GRAPH_FLOATS = ("tensor(float)", "tensor(float16)")

_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
          "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32, "tensor(bool)": torch.bool, "tensor(int8)": torch.int8,
          "tensor(uint8)": torch.uint8}
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8", torch.int32: "<i4",
            torch.bool: "|b1", torch.int8: "|i1", torch.uint8: "|u1"}


@dataclass(frozen=True)
class Position:
    """One input or output of a node: its name, its schema type string (``T`` or a fixed
    ``tensor(...)``) and the element types it may take in seqdeploy's graphs."""

    name: str
    type_str: str
    allowed: tuple[str, ...]

    @property
    def is_param(self) -> bool:
        return not self.type_str.startswith("tensor(")


def io_positions(op: "CustomOp") -> tuple[list[Position], list[Position]]:
    """The node's inputs and outputs from ``op.schema``, each with its allowed element types
    (a type parameter's allowed types cut to :data:`GRAPH_FLOATS`, or the one fixed type)."""
    constraints = {c.type_param_str: tuple(c.allowed_type_strs)
                   for c in op.schema.type_constraints}

    def position(p) -> Position:
        if p.type_str in constraints:
            allowed = tuple(t for t in GRAPH_FLOATS if t in constraints[p.type_str])
            if not allowed:
                allowed = constraints[p.type_str]
        else:
            allowed = (p.type_str,)
        return Position(p.name, p.type_str, allowed)

    return [position(p) for p in op.schema.inputs], [position(p) for p in op.schema.outputs]


def node_attributes(op: "CustomOp") -> list[str]:
    """The schema's attributes the torch op takes as keyword arguments (TensorRT's
    ``plugin_namespace``/``plugin_version`` routing attributes excluded)."""
    routing = set(plugin_attributes())
    return sorted(a for a in op.schema.attributes if a not in routing)


def default_shape_rule(op: "CustomOp") -> list:
    """Each output shaped like the first input of its own type string (``T`` outputs like
    the first ``T`` input), in :func:`graph_shape_rules`' form. Used only for a node whose
    exported graph carries no shapes."""
    inputs, outputs = io_positions(op)
    rule = []
    for out in outputs:
        src = next((i for i, inp in enumerate(inputs) if inp.type_str == out.type_str), 0)
        rule.append(("like", src))
    return rule


#: node name -> its output shape rule, set while a network is parsed (see
#: :func:`graph_shape_rules`): TensorRT's parser names each plugin after its node
_NODE_SHAPES: dict[str, list] = {}


class node_shapes:
    """Within this block, plugins created for the named nodes use these shape rules."""

    def __init__(self, rules: dict[str, list]):
        self.rules = rules

    def __enter__(self):
        _NODE_SHAPES.update(self.rules)
        return self

    def __exit__(self, *exc):
        for name in self.rules:
            _NODE_SHAPES.pop(name, None)
        return False


# -- raw pointers as torch tensors -------------------------------------------------------------
class _Buffer:
    """An array-interface view of memory TensorRT owns (``__cuda_array_interface__`` v2 for a
    device pointer, ``__array_interface__`` for a host one). v2 carries no stream: the caller
    has already made TensorRT's stream torch's current one."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype, device: str):
        iface = {"shape": tuple(shape), "typestr": _TYPESTR[dtype], "data": (int(ptr), False),
                 "strides": None, "version": 2 if device == "cuda" else 3}
        if device == "cuda":
            self.__cuda_array_interface__ = iface
        else:
            self.__array_interface__ = iface


def tensor_at(ptr: int, shape: Sequence[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A torch tensor over ``ptr`` (contiguous, not owned), on ``device`` ("cuda": a raw
    device pointer, as TensorRT hands plugins; "cpu": a host pointer, for tests)."""
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype not in _TYPESTR:
        raise TypeError(f"seqdeploy TensorRT plugins cannot wrap {dtype} buffers")
    buffer = _Buffer(ptr, shape, dtype, device)
    if device == "cuda":
        return torch.as_tensor(buffer, device="cuda")
    return torch.from_numpy(np.asarray(buffer))


def run_op(op: "CustomOp", attrs: dict[str, Any],
           inputs: Sequence[tuple[int, Sequence[int], torch.dtype]],
           outputs: Sequence[tuple[int, Sequence[int], torch.dtype]],
           device: str = "cuda", stream: int | None = None) -> None:
    """What a plugin's ``enqueue`` does: run ``op.torch_op`` on the buffers ``inputs`` (each
    ``(pointer, shape, dtype)``) on ``stream`` and write its results into ``outputs``.

    On CUDA, ``stream`` (TensorRT's ``cudaStream_t``) becomes torch's current stream, so the
    op's kernels and the copies into the output buffers are ordered after TensorRT's work and
    before what TensorRT enqueues next; nothing synchronises the host."""
    ins = [tensor_at(p, s, d, device) for p, s, d in inputs]
    outs = [tensor_at(p, s, d, device) for p, s, d in outputs]
    if device == "cuda" and stream is not None:
        context = torch.cuda.stream(torch.cuda.ExternalStream(int(stream)))
    else:
        context = _nothing()
    with context:
        result = op.torch_op(*ins, **attrs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(outs):
            raise RuntimeError(f"{op.onnx_name}: the op returned {len(results)} outputs, the "
                               f"node has {len(outs)}")
        for out, value in zip(outs, results):
            if tuple(out.shape) != tuple(value.shape):
                raise RuntimeError(f"{op.onnx_name}: output shape {list(value.shape)} differs "
                                   f"from TensorRT's {list(out.shape)} (the graph's shapes and the op disagree)")
            out.copy_(value)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- the plugin classes ------------------------------------------------------------------------
def trt_dtype(trt, type_str: str):
    D = trt.DataType
    return {"tensor(float)": D.FLOAT, "tensor(float16)": D.HALF, "tensor(bfloat16)": D.BF16,
            "tensor(int64)": D.INT64, "tensor(int32)": D.INT32, "tensor(bool)": D.BOOL,
            "tensor(int8)": D.INT8, "tensor(uint8)": D.UINT8}[type_str]


def torch_dtype(trt, dtype) -> torch.dtype:
    D = trt.DataType
    table = {D.FLOAT: torch.float32, D.HALF: torch.float16, D.BF16: torch.bfloat16,
             D.INT64: torch.int64, D.INT32: torch.int32, D.BOOL: torch.bool, D.INT8: torch.int8,
             D.UINT8: torch.uint8}
    return table[dtype]


def _field_value(field) -> Any:
    """A plugin field's value as a Python scalar, list or string."""
    data = np.asarray(field.data)
    if data.dtype.kind in "SUa" or str(field.type).endswith("CHAR"):
        raw = data.tobytes() if data.dtype.kind != "U" else str(data).encode()
        return raw.split(b"\0", 1)[0].decode()
    flat = data.reshape(-1).tolist()
    return flat[0] if len(flat) == 1 else flat


def plugin_classes(rt: "TensorRT", op: "CustomOp"):
    """``(Plugin, Creator)``: the ``IPluginV3`` and ``IPluginCreatorV3One`` of ``op`` for the
    TensorRT module ``rt.trt``."""
    trt = rt.trt
    inputs, outputs = io_positions(op)
    positions = [*inputs, *outputs]
    allowed = [{trt_dtype(trt, t) for t in p.allowed} for p in positions]
    # each type-parameter position must equal the first position of its parameter
    first_of = {}
    for i, p in enumerate(positions):
        if p.is_param:
            first_of.setdefault(p.type_str, i)
    attr_names = node_attributes(op)
    fallback_rule = default_shape_rule(op)
    out_types = []
    for out in outputs:
        if out.is_param:
            src = next((i for i, p in enumerate(inputs) if p.type_str == out.type_str), None)
            out_types.append(("input", src))
        else:
            out_types.append(("fixed", trt_dtype(trt, out.type_str)))

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                 trt.IPluginV3OneRuntime):
        __doc__ = f"TensorRT plugin {PLUGIN_NAMESPACE}::{op.onnx_name} v{PLUGIN_VERSION}: " \
                  f"runs seqdeploy op {op.name!r} through its torch op."

        def __init__(self, attrs: dict[str, Any] | None = None, shapes: list | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = op.onnx_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = len(outputs)
            # every instance of the op behaves alike: time the plugin once per build
            self.timing_cache_id = f"{op.onnx_name}.{op.version}"
            self.attrs = dict(attrs or {})
            self.shapes = shapes or fallback_rule

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return Plugin(self.attrs, self.shapes)

        # -- build
        def get_output_data_types(self, input_types):
            types = []
            for kind, value in out_types:
                types.append(input_types[value] if kind == "input" and value is not None
                             else (value if kind == "fixed" else input_types[0]))
            return types

        def get_output_shapes(self, in_dims, shape_inputs, builder):
            shapes = []
            for entry in self.shapes:
                if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == "like":
                    shapes.append(trt.DimsExprs(in_dims[entry[1]]))
                    continue
                dims = trt.DimsExprs(len(entry))
                for axis, d in enumerate(entry):
                    dims[axis] = (in_dims[d[0]][d[1]] if isinstance(d, tuple)
                                  else builder.constant(int(d)))
                shapes.append(dims)
            return shapes

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in allowed[pos]:
                return False
            p = positions[pos]
            first = first_of.get(p.type_str) if p.is_param else None
            return first is None or first >= pos or in_out[first].desc.type == desc.type

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # -- runtime
        def on_shape_change(self, inp, out):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(fields_of(trt, self.attrs))

        def enqueue(self, input_desc, output_desc, in_ptrs, out_ptrs, workspace, stream):
            run_op(op, self.attrs,
                   [(p, tuple(d.dims), torch_dtype(trt, d.type)) for p, d in zip(in_ptrs, input_desc)],
                   [(p, tuple(d.dims), torch_dtype(trt, d.type)) for p, d in zip(out_ptrs, output_desc)],
                   device="cuda", stream=stream)
            return 0

    class Creator(trt.IPluginCreatorV3One):
        __doc__ = f"Creates {PLUGIN_NAMESPACE}::{op.onnx_name} v{PLUGIN_VERSION} plugins."

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = op.onnx_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(a, np.array([], dtype=np.float32), trt.PluginFieldType.FLOAT32)
                 for a in attr_names])

        def create_plugin(self, name, fields, phase):
            attrs = {}
            for f in fields:
                if f.name in attr_names:
                    attrs[f.name] = _field_value(f)
            return Plugin(attrs, _NODE_SHAPES.get(name))

    Plugin.__name__ = Plugin.__qualname__ = f"{op.onnx_name}Plugin"
    Creator.__name__ = Creator.__qualname__ = f"{op.onnx_name}PluginCreator"
    return Plugin, Creator


def fields_of(trt, attrs: dict[str, Any]) -> list:
    """Plugin fields for ``attrs`` (floats as FLOAT32, ints as INT64, strings as CHAR)."""
    fields = []
    for name, value in sorted(attrs.items()):
        if isinstance(value, str):
            fields.append(trt.PluginField(name, np.frombuffer(value.encode() + b"\0", np.int8),
                                          trt.PluginFieldType.CHAR))
        elif isinstance(value, float) or (isinstance(value, list) and value
                                          and isinstance(value[0], float)):
            fields.append(trt.PluginField(name, np.atleast_1d(np.asarray(value, np.float32)),
                                          trt.PluginFieldType.FLOAT32))
        else:
            fields.append(trt.PluginField(name, np.atleast_1d(np.asarray(value, np.int64)),
                                          trt.PluginFieldType.INT64))
    return fields


# -- registration ------------------------------------------------------------------------------
_REGISTERED: dict[tuple[str, str], Any] = {}


def register_plugins(rt: "TensorRT", ops: Sequence["CustomOp"]) -> dict[str, str]:
    """Register one creator per op with TensorRT's plugin registry (once per process and
    TensorRT module); returns ``{onnx_name: "registered" | "error: ..."}``."""
    registry = rt.trt.get_plugin_registry()
    state = {}
    for op in ops:
        key = (rt.trt.__name__, op.onnx_name)
        if key in _REGISTERED:
            state[op.onnx_name] = "registered"
            continue
        try:
            _, creator_cls = plugin_classes(rt, op)
            creator = creator_cls()
            ok = registry.register_creator(creator, PLUGIN_NAMESPACE)
        except Exception as exc:   # a bad schema must not hide the other ops' plugins
            state[op.onnx_name] = f"error: {type(exc).__name__}: {exc}"
            continue
        if ok is False:
            state[op.onnx_name] = "error: TensorRT refused the creator"
            continue
        _REGISTERED[key] = creator   # the registry keeps a pointer; keep the object alive
        state[op.onnx_name] = "registered"
    return state


def registered_creator(rt: "TensorRT", onnx_name: str):
    """TensorRT's creator for ``seqdeploy::onnx_name`` v1, or None."""
    return rt.trt.get_plugin_registry().get_creator(onnx_name, PLUGIN_VERSION, PLUGIN_NAMESPACE)


class suspended:
    """Within this block seqdeploy's creators (Python and AOT forms) are deregistered, so
    TensorRT's ONNX parser inlines each custom node's fallback function (``--no-plugins``:
    the function form on purpose); they are registered again on exit."""

    def __init__(self, rt: "TensorRT"):
        self.rt = rt
        self.removed: list[Any] = []

    def __enter__(self):
        from seqdeploy.trt.aot import registered_creators

        registry = self.rt.trt.get_plugin_registry()
        mine = [c for (module, _), c in _REGISTERED.items() if module == self.rt.trt.__name__]
        for creator in [*mine, *registered_creators(self.rt)]:
            if registry.deregister_creator(creator):
                self.removed.append(creator)
        return self

    def __exit__(self, *exc):
        registry = self.rt.trt.get_plugin_registry()
        for creator in self.removed:
            registry.register_creator(creator, PLUGIN_NAMESPACE)
        return False
