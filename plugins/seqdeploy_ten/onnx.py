"""ONNX forms of ``EigenScan``: the exporter translation (one custom node) and the fallback
function (standard ops, a Scan over T with an fp32 state: the fp32 island of FP16 models)."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnxscript import values

from seqdeploy.ops import DOMAIN, make_function, plugin_attributes

_SEQDEPLOY = values.Opset(DOMAIN, 1)


def eigen_scan_translation(x_re, x_im, nu, theta, h0_re, h0_im):
    return _SEQDEPLOY.EigenScan(x_re, x_im, nu, theta, h0_re, h0_im, **plugin_attributes())


def _scan_body() -> onnx.GraphProto:
    """One step: (h_re, h_im, x_re_t, x_im_t) -> (h', h', y_t), lam from the outer scope."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["lam_re", "h_re"], ["rr"]),
        helper.make_node("Mul", ["lam_im", "h_im"], ["ii"]),
        helper.make_node("Mul", ["lam_re", "h_im"], ["ri"]),
        helper.make_node("Mul", ["lam_im", "h_re"], ["ir"]),
        helper.make_node("Sub", ["rr", "ii"], ["new_re0"]),
        helper.make_node("Add", ["ri", "ir"], ["new_im0"]),
        helper.make_node("Add", ["new_re0", "xt_re"], ["h_re_next"]),
        helper.make_node("Add", ["new_im0", "xt_im"], ["h_im_next"]),
        helper.make_node("Identity", ["h_re_next"], ["yt_re"]),
        helper.make_node("Identity", ["h_im_next"], ["yt_im"]),
    ]
    io = lambda names: [helper.make_tensor_value_info(n, f32, None) for n in names]  # noqa: E731
    return helper.make_graph(nodes, "eigen_scan_step", io(["h_re", "h_im", "xt_re", "xt_im"]),
                             io(["h_re_next", "h_im_next", "yt_re", "yt_im"]))


def eigen_scan_function(opset: int) -> onnx.FunctionProto:
    f32 = TensorProto.FLOAT
    cast = lambda src, dst: helper.make_node("Cast", [src], [dst], to=f32)  # noqa: E731
    nodes = [
        cast("x_re", "xr32"), cast("x_im", "xi32"), cast("h0_re", "hr32"), cast("h0_im", "hi32"),
        cast("nu", "nu32"), cast("theta", "th32"),
        helper.make_node("Exp", ["nu32"], ["rate"]),
        helper.make_node("Neg", ["rate"], ["log_mag"]),
        helper.make_node("Exp", ["log_mag"], ["mag"]),
        helper.make_node("Cos", ["th32"], ["cos"]),
        helper.make_node("Sin", ["th32"], ["sin"]),
        helper.make_node("Mul", ["mag", "cos"], ["lam_re"]),
        helper.make_node("Mul", ["mag", "sin"], ["lam_im"]),
        helper.make_node("Scan", ["hr32", "hi32", "xr32", "xi32"],
                         ["hT_re", "hT_im", "yr32", "yi32"], body=_scan_body(),
                         num_scan_inputs=2, scan_input_axes=[1, 1], scan_output_axes=[1, 1]),
        helper.make_node("CastLike", ["yr32", "x_re"], ["y_re"]),
        helper.make_node("CastLike", ["yi32", "x_re"], ["y_im"]),
    ]
    return make_function("EigenScan", ["x_re", "x_im", "nu", "theta", "h0_re", "h0_im"],
                         ["y_re", "y_im"], nodes, opset)
