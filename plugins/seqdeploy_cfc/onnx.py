"""ONNX forms of ``CfCScan``: the exporter translation (one custom node carrying ``dt``) and the
fallback function (standard ops only: a Scan over T with an fp32 state, the fp32 island of
FP16 models)."""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper
from onnxscript import values

from seqdeploy.ops import DOMAIN, make_function, plugin_attributes

_SEQDEPLOY = values.Opset(DOMAIN, 1)


def cfc_scan_translation(xw, h0, w_rec, tau, dt: float):
    return _SEQDEPLOY.CfCScan(xw, h0, w_rec, tau, dt=dt, **plugin_attributes())


def _scan_body() -> onnx.GraphProto:
    """One step: ``(h, x_t) -> (h', y_t)`` with ``h' = alpha h + gain tanh(x_t + h w)``;
    ``alpha``, ``gain`` and ``w32`` come from the enclosing scope."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["h", "w32"], ["hw"]),
        helper.make_node("Add", ["xt", "hw"], ["z"]),
        helper.make_node("Tanh", ["z"], ["act"]),
        helper.make_node("Mul", ["alpha", "h"], ["kept"]),
        helper.make_node("Mul", ["gain", "act"], ["drive"]),
        helper.make_node("Add", ["kept", "drive"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["yt"]),
    ]
    io = lambda names: [helper.make_tensor_value_info(n, f32, None) for n in names]  # noqa: E731
    return helper.make_graph(nodes, "cfc_scan_step", io(["h", "xt"]), io(["h_next", "yt"]))


def _dt_constant() -> onnx.NodeProto:
    """``dt_c = dt``: a Constant whose value refers to the function's ``dt`` attribute."""
    node = helper.make_node("Constant", [], ["dt_c"])
    ref = AttributeProto()
    ref.name, ref.type, ref.ref_attr_name = "value_float", AttributeProto.FLOAT, "dt"
    node.attribute.append(ref)
    return node


def _decay_nodes() -> list[onnx.NodeProto]:
    """``alpha = exp(x)`` and ``gain = 1 - alpha = -expm1(x)`` with ``x = -dt / tau``, in fp32.

    ONNX has no Expm1, and ``1 - exp(x)`` loses the leading digits of a small gain
    (``tau >> dt``). Kahan's identity ``expm1(x) = (u - 1) x / log(u)``, ``u = exp(x)``, keeps
    them; ``u == 1`` (``|x|`` below fp32 resolution) gives ``x`` and ``u - 1 == -1`` (``u``
    negligible, large ``dt / tau``) gives -1. The Where discards the 0/0 and x/-inf lanes.
    """
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    return [
        _dt_constant(),
        const("one", 1.0), const("minus_one", -1.0),
        helper.make_node("Cast", ["tau"], ["tau32"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["dt_c", "tau32"], ["rate"]),
        helper.make_node("Neg", ["rate"], ["x"]),
        helper.make_node("Exp", ["x"], ["alpha"]),
        helper.make_node("Sub", ["alpha", "one"], ["um1"]),
        helper.make_node("Log", ["alpha"], ["log_u"]),
        helper.make_node("Mul", ["um1", "x"], ["num"]),
        helper.make_node("Div", ["num", "log_u"], ["kahan"]),
        helper.make_node("Equal", ["um1", "minus_one"], ["saturated"]),
        helper.make_node("Where", ["saturated", "minus_one", "kahan"], ["em1_far"]),
        helper.make_node("Equal", ["alpha", "one"], ["exact_one"]),
        helper.make_node("Where", ["exact_one", "x", "em1_far"], ["expm1"]),
        helper.make_node("Neg", ["expm1"], ["gain"]),
    ]


def cfc_scan_function(opset: int) -> onnx.FunctionProto:
    f32 = TensorProto.FLOAT
    cast = lambda src, dst: helper.make_node("Cast", [src], [dst], to=f32)  # noqa: E731
    nodes = [
        cast("xw", "x32"), cast("h0", "h32"), cast("w_rec", "w32"),
        *_decay_nodes(),
        helper.make_node("Scan", ["h32", "x32"], ["hT", "y32"], body=_scan_body(),
                         num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]),
        helper.make_node("CastLike", ["y32", "xw"], ["y"]),
    ]
    return make_function("CfCScan", ["xw", "h0", "w_rec", "tau"], ["y"], nodes, opset,
                         attributes=("dt",))
