"""TensorRT's AOT plugin form (``seqdeploy.trt.aot``): every op's AOT entry kernel, launched
with the grid and scalars its declared launch computes from the input shapes, against the
op's float64 reference; its PTX for sm_80 and sm_90; and which form the plugin registration
and the engine builder give each node.

The registration itself (``tensorrt.plugin``) and AOT engines need full TensorRT >= 10.9,
which no machine here has: those paths never run (the tests say so where they skip).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from seqdeploy.trt import aot

import test_cfc_scan
import test_dlinoss_scan
import test_eigen_scan
import test_lam_ops

FLOATS = {torch.float32: "fp32", torch.float16: "fp16"}
#: the ops with an AOT entry (MoEExperts has none: its grouping runs its own launches)
AOT_OPS = {"CfCScan", "DualDeltaRule", "EigenScan", "LinossScan", "Top1Router"}


def load_op(name: str):
    from seqdeploy.plugins import load_registry

    return load_registry().ops[name]


def run_entry(op, args, attributes=None, dtype="fp32"):
    """Launch ``op``'s AOT entry in Triton's interpreter on ``args`` (the node's inputs, in
    schema order) with :func:`seqdeploy.trt.aot.plan`'s launch; outputs start as NaN (or -1
    for integer outputs), so anything left unwritten fails the comparison."""
    from seqdeploy.trt.plugins import io_positions

    inputs, outputs = io_positions(op)
    sizes = aot.ShapeSizes({p.name: tuple(a.shape) for p, a in zip(inputs, args)})
    io_types = aot.node_io_types(op, dtype)
    node = aot.plan(op, sizes, io_types, attributes or {}, None)
    torch_types = {"fp32": torch.float32, "fp16": torch.float16, "i64": torch.int64}
    outs = [torch.full(shape, -1 if t == "i64" else math.nan, dtype=torch_types[t])
            for shape, t in zip(node.output_shapes, io_types[len(inputs):])]
    node.entry.entry()[node.launch.grid](*args, *node.launch.scalars, *outs,
                                         **node.launch.constexprs,
                                         num_warps=node.launch.num_warps)
    return outs


def test_every_declared_entry_has_tensorrt_order(registry):
    """Every op that declares an AOT entry: the entry's runtime parameters are the op's inputs,
    its declared scalars and its outputs (``plan`` checks the count and the scalar names),
    and exactly the ops expected have one."""
    have = sorted(op.onnx_name for op in registry.ops.values() if op.trt_aot is not None)
    assert have == sorted(AOT_OPS)
    python_only = sorted(op.onnx_name for op in registry.ops.values() if op.trt_aot is None)
    assert python_only == ["MoEExperts"]
    for op in registry.ops.values():
        if op.trt_aot is None:
            continue
        runtime, constexprs = aot.entry_parameters(op.trt_aot.entry())
        inputs = len(op.schema.inputs)
        assert runtime[inputs:inputs + len(op.trt_aot.scalars)] == list(op.trt_aot.scalars)
        assert len(runtime) == inputs + len(op.trt_aot.scalars) + len(op.schema.outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,K", [(1, 1, 5), (2, 63, 21)])
def test_eigen_scan_entry_matches_naive(B, T, K, dtype):
    from seqdeploy_ten.ops import naive_eigen_scan

    args = test_eigen_scan.make(B, T, K, dtype)
    out = run_entry(load_op("eigen_scan"), args, dtype=FLOATS[dtype])
    assert test_eigen_scan.rel_l2(out, naive_eigen_scan(*args)) < test_eigen_scan.TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H", [(1, 1, 24), (17, 63, 33)])
def test_cfc_scan_entry_matches_naive(B, T, H, dtype):
    from seqdeploy_cfc.ops import naive_cfc_scan

    xw, h0, w_rec, tau = test_cfc_scan.make(B, T, H, dtype)
    dt = 0.3
    (y,) = run_entry(load_op("cfc_scan"), (xw, h0, w_rec, tau), {"dt": dt}, FLOATS[dtype])
    ref = naive_cfc_scan(xw, h0, w_rec, tau, dt)
    assert test_cfc_scan.rel_l2(y, ref) < test_cfc_scan.TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,P", [(1, 1, 7), (2, 63, 21)])
def test_linoss_scan_entry_matches_naive(B, T, P, dtype):
    from seqdeploy_dlinoss.ops import naive_linoss_scan

    args = test_dlinoss_scan.make(B, T, P, dtype)
    out = run_entry(load_op("linoss_scan"), args, dtype=FLOATS[dtype])
    assert test_dlinoss_scan.rel_l2(out, naive_linoss_scan(*args)) < test_dlinoss_scan.TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,n,d,dv", [(1, 1, 1, 8, 8), (2, 63, 2, 12, 20)])
def test_dual_delta_rule_entry_matches_naive(B, T, n, d, dv, dtype):
    from seqdeploy_lam.ops import naive_dual_delta_rule

    args = test_lam_ops.make(B, T, n, d, dv, dtype)
    o, state = run_entry(load_op("dual_delta_rule"), args, dtype=FLOATS[dtype])
    ref_o, ref_state = naive_dual_delta_rule(*args)
    assert test_lam_ops.rel(o, ref_o) < test_lam_ops.TOL[dtype]
    assert test_lam_ops.rel(state, ref_state) < test_lam_ops.TOL[dtype]


@pytest.mark.parametrize("B,T,E,capacity_factor", [(1, 1, 3, 1.0), (2, 63, 5, 0.8),
                                                   (3, 33, 4, 0.0), (2, 5, 2, 0.8)])
def test_top1_router_entry_matches_naive(B, T, E, capacity_factor):
    """The router is fp32 in every graph (its one dtype); with capacity the kernel computes
    ``cap`` itself from the attribute's bits (0.8 * 5 / 2 must give 2, not 3)."""
    from seqdeploy_moe.router import naive_top1_router

    g = torch.Generator().manual_seed(B * 100 + T)
    logits = 2.0 * torch.randn(B, T, E, generator=g)
    expert, gate = run_entry(load_op("top1_router"), (logits,),
                             {"capacity_factor": capacity_factor})
    want_expert, want_gate = naive_top1_router(logits, capacity_factor)
    assert torch.equal(expert, want_expert)
    assert torch.isfinite(gate).all()
    assert float((gate.double() - want_gate).abs().max()) < 1e-6
    if capacity_factor > 0 and T >= E:
        assert (gate == 0).any(), "the case should drop tokens"


def test_plan_refuses_a_size_the_kernel_needs_constant():
    """A constexpr that depends on a model width must come from a build-time constant."""

    class Symbolic(aot.ShapeSizes):
        def constant(self, tensor, axis):
            raise aot.AotError(f"{tensor} axis {axis} is not constant")

    op = load_op("eigen_scan")
    sizes = Symbolic({"x_re": (1, 4, 8), "x_im": (1, 4, 8), "nu": (8,), "theta": (8,),
                      "h0_re": (1, 8), "h0_im": (1, 8)})
    with pytest.raises(aot.AotError, match="nu axis 0"):
        aot.plan(op, sizes, aot.node_io_types(op, "fp32"), {}, None)
    with pytest.raises(aot.AotError, match="serves"):
        aot.plan(load_op("top1_router"), aot.ShapeSizes({"logits": (1, 2, 3)}),
                 ["fp16", "i64", "fp32"], {"capacity_factor": 1.0}, None)


def test_strip_hidden_params():
    ptx = (".version 8.0\n.visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u32 k_param_1,\n\t.param .u64 .ptr .global .align 1 k_param_2,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_3\n)\n{\n\tld.param.u64 %rd1, "
           "[k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}\n")
    stripped, removed = aot.strip_hidden_params(ptx, 2)
    assert removed == 2 and "k_param_2" not in stripped and "k_param_1" in stripped
    assert stripped.split("{", 1)[0].count(".param") == 2
    with pytest.raises(aot.AotError, match="reads its hidden parameter k_param_1"):
        aot.strip_hidden_params(ptx, 1)
    with pytest.raises(aot.AotError, match="fewer than"):
        aot.strip_hidden_params(ptx, 5)


COMPILE = textwrap.dedent("""
    import json, sys
    from seqdeploy.plugins import load_registry
    from seqdeploy.trt import aot

    SHAPES = {"EigenScan": {"x_re": (2, 64, 64), "x_im": (2, 64, 64), "nu": (64,),
                            "theta": (64,), "h0_re": (2, 64), "h0_im": (2, 64)},
              "CfCScan": {"xw": (2, 64, 128), "h0": (2, 128), "w_rec": (128, 128),
                          "tau": (128,)},
              "LinossScan": {"b_re": (2, 64, 64), "b_im": (2, 64, 64), "A": (64,),
                             "G": (64,), "dt": (64,), "state0": (2, 64, 4)},
              "Top1Router": {"logits": (2, 64, 8)},
              "DualDeltaRule": {"q": (2, 64, 4, 32), "k": (2, 64, 4, 32), "v": (2, 64, 4, 32),
                                "beta": (2, 64, 4), "g_fast": (2, 64, 4), "g_slow": (2, 64, 4),
                                "mix": (2, 64, 4), "state0": (2, 4, 2, 32, 32)}}
    ATTRS = {"CfCScan": {"dt": 0.1}, "Top1Router": {"capacity_factor": 1.25}}
    ops = {op.onnx_name: op for op in load_registry().ops.values() if op.trt_aot is not None}
    facts = []
    for name, op in sorted(ops.items()):
        for dtype in op.trt_aot.dtypes:
            for arch in (80, 90):
                node = aot.plan(op, aot.ShapeSizes(SHAPES[name]), aot.node_io_types(op, dtype),
                                ATTRS.get(name, {}), (arch // 10, arch % 10))
                c = aot.compile_entry(node, arch)
                entries = c.ptx.count(".entry")
                facts.append(dict(op=name, dtype=dtype, arch=arch, entries=entries,
                                  params=c.ptx.split(".entry", 1)[1].split(")", 1)[0].count(".param"),
                                  args=node.n_args, hidden=c.hidden, name=c.name,
                                  target=f".target sm_{arch}" in c.ptx))
                print(name, dtype, arch, "ok", flush=True)
    json.dump(facts, open(sys.argv[1], "w"))
""")


def test_entries_compile_to_ptx_for_sm80_and_sm90(tmp_path):
    """Each entry compiles to PTX for sm_80 and sm_90 without a GPU (a fresh process, outside
    the interpreter): one ``.entry`` whose parameters are inputs + scalars + outputs once
    Triton's hidden scratch pointers (which the kernels never read) are stripped, no scratch
    memory (``compile_entry`` refuses it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_file = tmp_path / "facts.json"
    done = subprocess.run([sys.executable, "-c", COMPILE, str(out_file)], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(out_file.read_text())
    assert {f["op"] for f in facts} == AOT_OPS
    assert len(facts) == 2 * (2 * len(AOT_OPS) - 1)     # fp32 + fp16 (the router: fp32)
    import triton

    hidden = 2 if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 3) else 0
    for f in facts:
        assert f["entries"] == 1 and f["target"], f
        assert f["params"] == f["args"], f
        assert f["hidden"] == hidden, f


def test_registration_skips_without_tensorrt_plugin():
    """TensorRT-RTX (the only TensorRT here) has no ``tensorrt.plugin``: the AOT registration
    skips every op with an entry, saying why, and every node keeps the Python form."""
    from seqdeploy.errors import EngineUnavailable
    from seqdeploy.plugins import load_registry
    from seqdeploy.trt import adapter

    try:
        rt = adapter.load()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    if rt.has_aot_plugins:
        pytest.skip(f"{rt.describe()} offers AOT plugins; this test covers TensorRT-RTX")
    ops = list(load_registry().ops.values())
    state = aot.register_aot_plugins(rt, ops)
    assert set(state) == AOT_OPS
    for why in state.values():
        assert why.startswith("skipped: ") and "full TensorRT >= 10.9" in why
    assert set(aot.plugin_forms(rt, ops).values()) == {"python"}


def test_engine_key_and_report_carry_the_plugin_form():
    """An engine whose nodes hold the AOT form is another cache entry than the Python form's,
    and the report names the engine's form from its nodes' forms."""
    from seqdeploy.trt.builder import engine_form
    from seqdeploy.trt.cache import engine_key

    ops = [load_op("eigen_scan")]
    python = engine_key("0" * 64, ops, "tensorrt 10.9", "sm90", True, {}, {"EigenScan": "python"})
    aot_key = engine_key("0" * 64, ops, "tensorrt 10.9", "sm90", True, {}, {"EigenScan": "aot"})
    assert python != aot_key
    assert python == engine_key("0" * 64, ops, "tensorrt 10.9", "sm90", True, {})
    assert engine_form({"a": "aot", "b": "python"}, True) == "aot+python-plugin"
    assert engine_form({"a": "aot"}, True) == "aot-plugin"
    assert engine_form({"a": "python"}, True) == "python-plugin"
    assert engine_form({"a": "aot"}, False) == "onnx-function"
