"""ONNX forms of ``LinossScan``: the exporter translation (one custom node) and the fallback
function (standard ops: a Scan over T with an fp32 state, the fp32 island of FP16 models).

Node signature (domain ``seqdeploy``, version 1), type ``T`` in fp32 / fp16 / bf16:
inputs ``b_re: T [B,T,P]``, ``b_im: T [B,T,P]``, ``A: float [P]``, ``G: float [P]``,
``dt: float [P]``, ``state0: float [B,P,4]``; outputs ``x_re: T [B,T,P]``,
``x_im: T [B,T,P]``, ``stateT: float [B,P,4]``.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnxscript import values

from seqdeploy.ops import DOMAIN, make_function, plugin_attributes

_SEQDEPLOY = values.Opset(DOMAIN, 1)


def linoss_scan_translation(b_re, b_im, A, G, dt, state0):
    return _SEQDEPLOY.LinossScan(b_re, b_im, A, G, dt, state0, **plugin_attributes())


def _scan_body() -> onnx.GraphProto:
    """One step in the (z, x) update form, for the real and the imaginary part:
    ``z' = (z - dtA x + dt b) * inv_s``, ``x' = x + dt z'``; ``dtA``, ``dt`` and ``inv_s``
    come from the outer scope."""
    nodes = []
    for part in ("re", "im"):
        z, x, b = f"z_{part}", f"x_{part}", f"bt_{part}"
        nodes += [
            helper.make_node("Mul", ["dtA", x], [f"ax_{part}"]),
            helper.make_node("Sub", [z, f"ax_{part}"], [f"u_{part}"]),
            helper.make_node("Mul", ["dt32", b], [f"db_{part}"]),
            helper.make_node("Add", [f"u_{part}", f"db_{part}"], [f"v_{part}"]),
            helper.make_node("Mul", [f"v_{part}", "inv_s"], [f"{z}_next"]),
            helper.make_node("Mul", ["dt32", f"{z}_next"], [f"dz_{part}"]),
            helper.make_node("Add", [x, f"dz_{part}"], [f"{x}_next"]),
            helper.make_node("Identity", [f"{x}_next"], [f"xt_{part}"]),
        ]
    io = lambda names: [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
                        for n in names]
    return helper.make_graph(
        nodes, "linoss_scan_step", io(["z_re", "z_im", "x_re", "x_im", "bt_re", "bt_im"]),
        io(["z_re_next", "z_im_next", "x_re_next", "x_im_next", "xt_re", "xt_im"]))


def linoss_scan_function(opset: int) -> onnx.FunctionProto:
    f32 = TensorProto.FLOAT
    cast = lambda src, dst: helper.make_node("Cast", [src], [dst], to=f32)  # noqa: E731
    nodes = [cast("b_re", "br32"), cast("b_im", "bi32"), cast("A", "A32"), cast("G", "G32"),
             cast("dt", "dt32"), cast("state0", "s32"),
             helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", f32, [], [1.0])),
             helper.make_node("Mul", ["dt32", "G32"], ["dtG"]),
             helper.make_node("Add", ["one", "dtG"], ["S"]),
             helper.make_node("Reciprocal", ["S"], ["inv_s"]),
             helper.make_node("Mul", ["dt32", "A32"], ["dtA"])]
    names = ("z_re0", "z_im0", "x_re0", "x_im0")
    for k, name in enumerate(names):
        nodes += [helper.make_node("Constant", [], [f"k{k}"],
                                   value=helper.make_tensor(f"k{k}", TensorProto.INT64, [], [k])),
                  helper.make_node("Gather", ["s32", f"k{k}"], [name], axis=2)]
    nodes += [
        helper.make_node("Scan", [*names, "br32", "bi32"],
                         ["zT_re", "zT_im", "xT_re", "xT_im", "xr32", "xi32"], body=_scan_body(),
                         num_scan_inputs=2, scan_input_axes=[1, 1], scan_output_axes=[1, 1]),
        helper.make_node("Constant", [], ["last_axis"],
                         value=helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1])),
    ]
    finals = ("zT_re", "zT_im", "xT_re", "xT_im")
    nodes += [helper.make_node("Unsqueeze", [f, "last_axis"], [f"{f}_u"]) for f in finals]
    nodes += [helper.make_node("Concat", [f"{f}_u" for f in finals], ["stateT"], axis=2),
              helper.make_node("CastLike", ["xr32", "b_re"], ["x_re"]),
              helper.make_node("CastLike", ["xi32", "b_re"], ["x_im"])]
    return make_function("LinossScan", ["b_re", "b_im", "A", "G", "dt", "state0"],
                         ["x_re", "x_im", "stateT"], nodes, opset)
