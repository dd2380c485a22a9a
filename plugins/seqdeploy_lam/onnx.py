"""ONNX forms of ``DualDeltaRule``: the exporter translation (one custom node) and the fallback
function (standard ops only: a Scan over T carrying both memories ``[B, n, 2, d, dv]`` in fp32,
the fp32 island of FP16 models; decays are exponentiated inside it, in fp32)."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnxscript import values

from seqdeploy.ops import DOMAIN, make_function, plugin_attributes

_SEQDEPLOY = values.Opset(DOMAIN, 1)
_INPUTS = ["q", "k", "v", "beta", "g_fast", "g_slow", "mix", "state0"]


def dual_delta_rule_translation(q, k, v, beta, g_fast, g_slow, mix, state0):
    return _SEQDEPLOY.DualDeltaRule(q, k, v, beta, g_fast, g_slow, mix, state0,
                                    **plugin_attributes())


def _axes(name: str, axes: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name],
                            value=helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes))


def _scan_body() -> onnx.GraphProto:
    """One token for both memories: (S [B,n,2,d,dv], q_t, k_t [B,n,d], v_t [B,n,dv],
    beta_t, gf_t, gs_t, mix_t [B,n]) -> (S', S', o_t [B,n,dv])."""
    n = helper.make_node
    nodes = [
        _axes("ax2", [2]), _axes("ax3", [3]), _axes("ax23", [2, 3]), _axes("ax24", [2, 4]),
        _axes("ax34", [3, 4]),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])),
        # decays of both memories: a = exp([g_fast, g_slow]) as [B, n, 2, 1, 1]
        n("Unsqueeze", ["gf", "ax2"], ["gf3"]), n("Unsqueeze", ["gs", "ax2"], ["gs3"]),
        n("Concat", ["gf3", "gs3"], ["g2"], axis=2), n("Exp", ["g2"], ["a2"]),
        n("Unsqueeze", ["a2", "ax34"], ["a5"]),
        n("Mul", ["a5", "S"], ["Sd"]),
        # S' = a S + k (beta (v - (a S)^T k))^T
        n("Unsqueeze", ["kt", "ax24"], ["k5"]),
        n("Mul", ["Sd", "k5"], ["Sk"]), n("ReduceSum", ["Sk", "ax3"], ["pred"], keepdims=0),
        n("Unsqueeze", ["vt", "ax2"], ["v4"]), n("Sub", ["v4", "pred"], ["err"]),
        n("Unsqueeze", ["bt", "ax23"], ["b4"]), n("Mul", ["b4", "err"], ["u"]),
        n("Unsqueeze", ["u", "ax3"], ["u5"]), n("Mul", ["k5", "u5"], ["ku"]),
        n("Add", ["Sd", "ku"], ["S_next"]),
        # o^s = S'^T q; o = mix o^fast + (1 - mix) o^slow
        n("Unsqueeze", ["qt", "ax24"], ["q5"]), n("Mul", ["S_next", "q5"], ["Sq"]),
        n("ReduceSum", ["Sq", "ax3"], ["os"], keepdims=0),
        n("Unsqueeze", ["mt", "ax2"], ["m3"]), n("Sub", ["one", "m3"], ["m3c"]),
        n("Concat", ["m3", "m3c"], ["w3"], axis=2), n("Unsqueeze", ["w3", "ax3"], ["w4"]),
        n("Mul", ["os", "w4"], ["ow"]), n("ReduceSum", ["ow", "ax2"], ["ot"], keepdims=0),
        n("Identity", ["S_next"], ["S_out"]),
    ]
    f32 = TensorProto.FLOAT
    io = lambda names: [helper.make_tensor_value_info(x, f32, None) for x in names]  # noqa: E731
    return helper.make_graph(nodes, "dual_delta_rule_step",
                             io(["S", "qt", "kt", "vt", "bt", "gf", "gs", "mt"]),
                             io(["S_out", "ot"]))


def dual_delta_rule_function(opset: int) -> onnx.FunctionProto:
    f32 = TensorProto.FLOAT
    casts = [helper.make_node("Cast", [x], [x + "32"], to=f32) for x in _INPUTS]
    nodes = [
        *casts,
        helper.make_node("Scan", ["state032", "q32", "k32", "v32", "beta32", "g_fast32",
                                  "g_slow32", "mix32"], ["stateT", "o32"], body=_scan_body(),
                         num_scan_inputs=7, scan_input_axes=[1] * 7, scan_output_axes=[1]),
        helper.make_node("CastLike", ["o32", "q"], ["o"]),
    ]
    return make_function("DualDeltaRule", _INPUTS, ["o", "stateT"], nodes, opset)
