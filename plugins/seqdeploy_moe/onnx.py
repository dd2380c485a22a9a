"""ONNX forms of ``Top1Router`` and ``MoEExperts``: the exporter translations (one custom node
each; the router's carries the float attribute ``capacity_factor``) and the fallback
functions, made of standard ops only (no Loop or Scan), for runtimes without seqdeploy
kernels.

- ``Top1Router``: ReduceMax / ArgMax (first maximal index) / Exp / ReduceSum in fp32; the
  capacity rank is the CumSum along T of the one-hot choices, and ``cap`` is computed in
  fp32 exactly as the other forms do (``router.capacity``).
- ``MoEExperts``: computes every expert's FFN for every token (one broadcast MatMul per layer,
  ``[B, T, E, 1, f]``) and keeps each token's own expert (GatherElements). That is E times
  the work of the kernels and is only the portability path: correct everywhere, slow.
  All arithmetic is fp32 (an fp32 island in fp16 graphs).
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper
from onnxscript import values

from seqdeploy.ops import DOMAIN, make_function, plugin_attributes

_SEQDEPLOY = values.Opset(DOMAIN, 1)


def top1_router_translation(logits, capacity_factor: float):
    return _SEQDEPLOY.Top1Router(logits, capacity_factor=capacity_factor, **plugin_attributes())


def moe_experts_translation(x, expert, gate, w1, b1, w2, b2):
    return _SEQDEPLOY.MoEExperts(x, expert, gate, w1, b1, w2, b2, **plugin_attributes())


def _const(name: str, dtype: int, value) -> onnx.NodeProto:
    """A Constant: a list gives a 1-D tensor, a number a scalar."""
    vals, dims = (value, [len(value)]) if isinstance(value, list) else ([value], [])
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def _attribute_constant(name: str, attribute: str) -> onnx.NodeProto:
    """``name = attribute``: a Constant whose value refers to the function's float attribute."""
    node = helper.make_node("Constant", [], [name])
    ref = AttributeProto()
    ref.name, ref.type, ref.ref_attr_name = "value_float", AttributeProto.FLOAT, attribute
    node.attribute.append(ref)
    return node


def top1_router_function(opset: int) -> onnx.FunctionProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    n = helper.make_node
    nodes = [
        _attribute_constant("cf", "capacity_factor"),
        _const("last", i64, [-1]), _const("axis_t", i64, 1), _const("one", i64, 1),
        _const("two", i64, 2), _const("zero_i", i64, 0), _const("zero_d", f32, 0.0),
        _const("zero_f", f32, 0.0),
        n("Cast", ["logits"], ["lg"], to=f32),
        # softmax pieces: gate = p[argmax] = 1 / sum exp(l - max)
        n("ReduceMax", ["lg", "last"], ["m"], keepdims=1),
        n("Sub", ["lg", "m"], ["z"]),
        n("Exp", ["z"], ["ez"]),
        n("ReduceSum", ["ez", "last"], ["total"], keepdims=0),
        n("Reciprocal", ["total"], ["gate_all"]),
        n("ArgMax", ["lg"], ["expert"], axis=-1, keepdims=0, select_last_index=0),
        # cap = ceil(fp32(cf * T) / E) in fp32; cf <= 0: no dropping (cap = T)
        n("Shape", ["lg"], ["shape"]),
        n("Gather", ["shape", "one"], ["T"], axis=0),
        n("Gather", ["shape", "two"], ["E"], axis=0),
        n("Cast", ["cf"], ["cfd"], to=f32),
        n("Cast", ["T"], ["Td"], to=f32),
        n("Cast", ["E"], ["Ed"], to=f32),
        n("Mul", ["cfd", "Td"], ["cf_t"]),
        n("Div", ["cf_t", "Ed"], ["quota"]),
        n("Ceil", ["quota"], ["cap_on"]),
        n("Greater", ["cfd", "zero_d"], ["dropping"]),
        n("Where", ["dropping", "cap_on", "Td"], ["cap"]),
        # 1-based rank of each token among its row's tokens of the same expert
        n("Range", ["zero_i", "E", "one"], ["ids"]),
        n("Unsqueeze", ["expert", "last"], ["expert_1"]),
        n("Equal", ["expert_1", "ids"], ["chosen"]),
        n("Cast", ["chosen"], ["one_hot"], to=f32),   # exact counts up to 2^24
        n("CumSum", ["one_hot", "axis_t"], ["running"]),
        n("Mul", ["running", "one_hot"], ["rank_e"]),
        n("ReduceSum", ["rank_e", "last"], ["rank"], keepdims=0),
        n("LessOrEqual", ["rank", "cap"], ["kept"]),
        n("Where", ["kept", "gate_all", "zero_f"], ["gate"]),
    ]
    return make_function("Top1Router", ["logits"], ["expert", "gate"], nodes, opset,
                         attributes=["capacity_factor"])


def moe_experts_function(opset: int) -> onnx.FunctionProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    n = helper.make_node
    cast = lambda src, dst: n("Cast", [src], [dst], to=f32)  # noqa: E731
    nodes = [
        _const("axes_x", i64, [2, 3]), _const("axis_1", i64, [1]), _const("last", i64, [-1]),
        _const("half", f32, 0.5), _const("one_f", f32, 1.0), _const("zero_f", f32, 0.0),
        _const("rsqrt2", f32, 0.7071067811865476),
        cast("x", "x32"), cast("w1", "w1_32"), cast("b1", "b1_32"), cast("w2", "w2_32"),
        cast("b2", "b2_32"), cast("gate", "g32"),
        # x [B, T, d] -> [B, T, 1, 1, d]; times w1 [E, d, f] -> [B, T, E, 1, f]
        n("Unsqueeze", ["x32", "axes_x"], ["xe"]),
        n("MatMul", ["xe", "w1_32"], ["xw1"]),
        n("Unsqueeze", ["b1_32", "axis_1"], ["b1_e"]),            # [E, 1, f]
        n("Add", ["xw1", "b1_e"], ["z_all"]),
        # keep each token's expert: index [B, T, 1, 1, 1] broadcast over the last axis
        n("Unsqueeze", ["expert", "axes_x"], ["idx4"]),          # [B, T, 1, 1]
        n("Unsqueeze", ["idx4", "last"], ["idx"]),               # [B, T, 1, 1, 1]
        n("Shape", ["z_all"], ["f_dim"], start=-1),
        n("Shape", ["idx"], ["idx_shape"], end=-1),
        n("Concat", ["idx_shape", "f_dim"], ["idx_f_shape"], axis=0),
        n("Expand", ["idx", "idx_f_shape"], ["idx_f"]),
        n("GatherElements", ["z_all", "idx_f"], ["z"], axis=2),  # [B, T, 1, 1, f]
        # exact GELU: 0.5 z (1 + erf(z / sqrt 2))
        n("Mul", ["z", "rsqrt2"], ["zs"]),
        n("Erf", ["zs"], ["erf"]),
        n("Add", ["erf", "one_f"], ["erf1"]),
        n("Mul", ["z", "erf1"], ["zerf"]),
        n("Mul", ["zerf", "half"], ["h"]),
        # h [B, T, 1, 1, f] times w2 [E, f, d] -> [B, T, E, 1, d], keep the token's expert
        n("MatMul", ["h", "w2_32"], ["hw2"]),
        n("Unsqueeze", ["b2_32", "axis_1"], ["b2_e"]),
        n("Add", ["hw2", "b2_e"], ["o_all"]),
        n("Shape", ["o_all"], ["d_dim"], start=-1),
        n("Concat", ["idx_shape", "d_dim"], ["idx_d_shape"], axis=0),
        n("Expand", ["idx", "idx_d_shape"], ["idx_d"]),
        n("GatherElements", ["o_all", "idx_d"], ["o5"], axis=2),
        n("Squeeze", ["o5", "axes_x"], ["o"]),                   # [B, T, d]
        # gate; a dropped token (gate 0) is exactly 0
        n("Unsqueeze", ["g32", "last"], ["g"]),
        n("Mul", ["o", "g"], ["scaled"]),
        n("Equal", ["g", "zero_f"], ["dropped"]),
        n("Where", ["dropped", "zero_f", "scaled"], ["y32"]),
        n("CastLike", ["y32", "x"], ["y"]),
    ]
    return make_function("MoEExperts", ["x", "expert", "gate", "w1", "b1", "w2", "b2"], ["y"],
                         nodes, opset)
