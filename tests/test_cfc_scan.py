"""cfc_scan: float64 naive loop vs step-loop reference vs CPU op vs Triton vs the ONNX fallback,
then the `cfc` model through the whole pipeline.

Triton runs through its interpreter on CPU-only machines and for real on a GPU. Outputs are
poisoned with NaN before each kernel runs, so an unwritten element fails the test. Kernel
designs are reached through the dispatch (``kernels.choose``) and its ``LaunchPlan``: on CPU
the rows design, and the split design one step per launch (its cluster exchange and the
Gluon wgmma design run only compiled, in the GPU tests).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, compile_and_trace, gpu, run_cli, make_model
from onnx import TensorProto, helper

from seqdeploy.ops import DOMAIN, reference_ops
from seqdeploy_cfc import kernels
from seqdeploy_cfc.kernels import LaunchPlan, choose, triton_cfc_scan
from seqdeploy_cfc.onnx import cfc_scan_function
from seqdeploy_cfc.ops import cfc_scan, cpu_cfc_scan, naive_cfc_scan, reference_cfc_scan

# Max rel-L2 against the float64 loop run on the same (already rounded) inputs. Measured
# (T=512, H=64, spectral radius of w_rec ~1 and ~1.5): fp32 2e-7; fp16 1.9e-4 for the fp32-state CPU forms
# (the rounding of y itself) and 2.8e-4 for Triton, bf16 1.5e-3 and 3.1e-3. Triton's excess is
# h rounded to the input dtype for the tensor-core dot and fed back through tanh every step.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, T, H, dtype, device="cpu", seed=0, strided=False, w_scale=1.0):
    """Inputs of the op: ``xw, h0, w_rec`` in ``dtype``, ``tau`` fp32 (spread over 0.01..~10).

    ``strided``: ``xw`` is the first H columns of a wider projection and ``h0`` is one layer
    of a ``[B, L, H]`` state, as the model passes them."""
    g = torch.Generator().manual_seed(seed)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    if strided:   # slice after the cast, which would otherwise make them contiguous
        xw = cast(torch.randn(B, T, H + 5, generator=g))[..., :H]
        h0 = cast(0.5 * torch.randn(B, 3, H, generator=g))[:, 1]
    else:
        xw = cast(torch.randn(B, T, H, generator=g))
        h0 = cast(0.5 * torch.randn(B, H, generator=g))
    w_rec = torch.randn(H, H, generator=g) * (w_scale / math.sqrt(H))
    tau = F.softplus(2.0 * torch.randn(H, generator=g)) + 0.01
    return xw, h0, cast(w_rec), tau.to(device)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    y = out.double().cpu()
    assert torch.isfinite(y).all(), "NaN/Inf in output (unwritten or overflowed)"
    return float((y - ref).norm() / ref.norm())


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full(like.shape, math.nan, dtype=like.dtype, device=like.device)


def cpu(args):
    return [a.cpu() for a in args]


# -- the oracle ------------------------------------------------------------------------------
def test_naive_loop_matches_closed_form():
    """With w_rec = 0 and a constant input, h_t = a^t h0 + (1 - a^t) tanh(c)."""
    B, T, H = 2, 40, 3
    tau = torch.tensor([0.3, 2.0, 50.0], dtype=torch.float64)
    c = torch.tensor([0.7, -1.5, 3.0], dtype=torch.float64)
    h0 = torch.tensor([[0.2, -0.4, 0.9], [-1.0, 0.0, 0.5]], dtype=torch.float64)
    dt = 0.5
    y = naive_cfc_scan(c.expand(B, T, H), h0, torch.zeros(H, H, dtype=torch.float64), tau, dt)
    a_t = torch.exp(-dt / tau)[None, :] ** torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    expected = a_t[None] * h0[:, None] + (1 - a_t[None]) * torch.tanh(c)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)


# -- every form against the oracle -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,strided", [(2, 1, 16, False), (3, 63, 20, True), (2, 300, 7, False)])
def test_cpu_forms_match_naive(B, T, H, strided, dtype):
    args = make(B, T, H, dtype, strided=strided)
    ref = naive_cfc_scan(*args, 0.7)
    assert rel_l2(reference_cfc_scan(*args, 0.7), ref) < TOL[dtype]
    assert rel_l2(cpu_cfc_scan(*args, 0.7), ref) < TOL[dtype]
    out = cfc_scan(*args, 0.7)               # the registered op: the step loop on CPU
    assert out.dtype == dtype and out.shape == (B, T, H) and out.is_contiguous()
    assert rel_l2(out, ref) < TOL[dtype]


def rows_plan(B, H, dtype, device=DEVICE, **change) -> LaunchPlan:
    """The dispatch's rows plan for ``device`` (what it picks over several steps where no
    thread-block clusters launch), with ``change`` applied."""
    gpu = kernels.gpu_of(device)
    gpu = gpu and dataclasses.replace(gpu, clusters=False, wgmma=False)
    return dataclasses.replace(choose(B, 2, H, dtype, gpu), **change)


def split_plan(B, T, H, dtype, device=DEVICE, **change) -> LaunchPlan:
    """The dispatch's split plan for ``device``: the cluster split over several steps (where
    clusters launch), the cluster-less one for a single step; ``change`` applied. On the
    interpreter, the single-step plan of a GPU without tanh.approx (the kernel's CPU form)."""
    gpu = kernels.gpu_of(device)
    if gpu is None:
        gpu = kernels.Gpu(sms=132, capability=(7, 0), clusters=False, wgmma=False)
        change = {"dot_f32": dtype != torch.float16, **change}   # bf16: see LaunchPlan
    plan = choose(B, T, max(H, 256) if T > 1 else max(H, 48), dtype,
                  dataclasses.replace(gpu, wgmma=False))
    block_h = max(16, 1 << (H - 1).bit_length())
    plan = dataclasses.replace(plan, block_h=block_h, block_n=min(plan.block_n, block_h))
    assert plan.design == "split", plan
    return dataclasses.replace(plan, **change)


def clusters_here() -> bool:
    gpu = kernels.gpu_of("cuda") if torch.cuda.is_available() else None
    return bool(gpu and gpu.clusters)


def wgmma_here() -> bool:
    gpu = kernels.gpu_of("cuda") if torch.cuda.is_available() else None
    return bool(gpu and gpu.wgmma)


needs_clusters = pytest.mark.skipif(not clusters_here(),
                                    reason="needs thread-block cluster launches")
needs_wgmma = pytest.mark.skipif(
    not wgmma_here(), reason="the wgmma design needs clusters, compute capability 9.x, Gluon")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_resident", [True, False], ids=["w-resident", "w-streamed"])
@pytest.mark.parametrize("B,T,H,strided", [(2, 1, 16, False), (3, 63, 20, True),
                                           (19, 37, 40, False)])
def test_rows_matches_naive(B, T, H, strided, w_resident, dtype):
    """The rows design: odd H (padded to a power of two >= 16), B above one 16-row block, both
    homes of w_rec (the streamed one with two contraction slices at H=40: block_k 32 of
    block_h 64)."""
    args = make(B, T, H, dtype, DEVICE, strided=strided)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                          plan=rows_plan(B, H, dtype, w_resident=w_resident))
    assert out.dtype == dtype
    assert rel_l2(out, ref) < TOL[dtype]


@pytest.mark.parametrize("block_b,num_warps,block_k", [(32, 2, 16), (64, 4, 64)])
def test_rows_tilings_agree(block_b, num_warps, block_k):
    """Other tilings of the rows plan change the work split, not the result."""
    args = make(40, 9, 48, torch.float32, DEVICE, seed=4)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    for w_resident in (True, False):
        plan = rows_plan(40, 48, torch.float32, block_b=block_b, num_warps=num_warps,
                         w_resident=w_resident, block_k=block_k)
        out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
        assert rel_l2(out, ref) < TOL[torch.float32]


def test_triton_long_sequence():
    """T = 1000 (in the interpreter with few units: it emulates every element)."""
    B, T, H = (2, 1000, 24) if DEVICE == "cpu" else (8, 4096, 256)
    args = make(B, T, H, torch.float32, DEVICE, seed=5, w_scale=1.5)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]))
    assert rel_l2(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_resident", [True, False], ids=["w-resident", "w-streamed"])
def test_split_single_steps_match_naive(w_resident, dtype):
    """The split design without clusters, which runs one step per launch: several column
    blocks (H=40 in blocks of 16, the last one partial) and batch blocks, strided inputs.
    In fp32 the state handed from call to call is exact, so 6 chained calls are the 6-step
    scan."""
    B, T, H = 19, 6, 40
    args = make(B, T, H, dtype, DEVICE, seed=6, strided=True)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    plan = split_plan(B, 1, H, dtype, block_n=16, w_resident=w_resident)
    xw, h, w_rec, tau = args
    steps = []
    for t in range(T if dtype == torch.float32 else 1):
        y = triton_cfc_scan(xw[:, t:t + 1], h, w_rec, tau, 1.0, out=poisoned(xw[:, :1]),
                            plan=plan)
        steps.append(y)
        h = y[:, 0]
    out = torch.cat(steps, 1)
    assert rel_l2(out, ref[:, :out.shape[1]]) < TOL[dtype]


def test_plans_that_cannot_run_are_refused():
    """A plan that needs what these inputs or this machine lack is a one-line error before
    anything runs: split without clusters over several steps (nothing would hand h from
    one program to another), cluster launches in the interpreter or on CPU tensors, the
    wgmma design there, more column blocks than a cluster holds."""
    args = make(20, 5, 40, torch.float32, "cpu")
    single = split_plan(20, 1, 40, torch.float32, "cpu", block_n=16)
    with pytest.raises(ValueError, match="single step"):
        triton_cfc_scan(*args, 1.0, plan=single)
    for plan in (dataclasses.replace(single, cluster=True),
                 dataclasses.replace(single, design="wgmma", cluster=True),
                 dataclasses.replace(single, cluster=True, block_n=2)):
        with pytest.raises(RuntimeError, match="cfc_scan plan"):
            triton_cfc_scan(*args, 1.0, plan=plan)


#: the dispatch table: ``choose``'s plan per "<gpu> <B>,<T>,<H> <dtype>", recorded by running
#: the dispatch of main 7b3192e (before this file's designs were split out) on the same
#: inputs. Entries with "was" changed on purpose ("why"); all others are what 7b3192e chose.
TABLE = json.loads((Path(__file__).parent / "data" / "cfc_dispatch.json").read_text())
GPUS = {"cpu": None,   # the interpreter
        "h100": kernels.Gpu(132, (9, 0), clusters=True, wgmma=True),   # triton 3.6
        "a100": kernels.Gpu(108, (8, 0), clusters=False, wgmma=False),
        "b200": kernels.Gpu(148, (10, 0), clusters=True, wgmma=False)}


def test_dispatch_table_is_pinned():
    """``choose`` at the seed's four points, small and odd shapes, single steps, large B and
    H = 1024, in fp32 / fp16 / bf16, for the interpreter and three GPUs: every field of the
    plan, including its grid and cluster size. The changes from 7b3192e: on a GPU without
    cluster launches, several steps run rows where the removed flag-in-data exchange ran
    split; the Triton cluster kernel has no two-half-K-dot form (it only ran where the wgmma
    form cannot: not on Hopper), and H = 1024 with clusters, which raised, now runs it."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    changed = {}
    for key, want in TABLE.items():
        env, shape, dtype = key.split()
        B, T, H = map(int, shape.split(","))
        plan = choose(B, T, H, dtypes[dtype], GPUS[env])
        got = {**dataclasses.asdict(plan), "grid": plan.grid(B, H),
               "cluster": plan.column_blocks(H) if plan.cluster else 0}
        assert got == {k: v for k, v in want.items() if k not in ("was", "why")}, key
        if "was" in want:
            changed[want["why"]] = changed.get(want["why"], 0) + 1
            if "flag-in-data" in want["why"]:
                assert env == "a100" and T > 1 and want["was"]["design"] == "split"
    # every seed point on the H100 is unchanged, and is the wgmma design in fp16 / bf16
    for (B, T, H) in [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512)]:
        for dtype in ("fp16", "bf16", "fp32"):
            want = TABLE[f"h100 {B},{T},{H} {dtype}"]
            assert "was" not in want and want["design"] == ("split" if dtype == "fp32"
                                                            else "wgmma")
    assert sorted(changed.values()) == [4, 12, 22], changed


def test_dispatch_on_this_machine():
    """``gpu_of`` describes where kernels run: nothing on CPU tensors or in the interpreter,
    where every default plan is rows."""
    assert kernels.gpu_of("cpu") is None
    if DEVICE == "cpu":
        assert kernels.gpu_of("cuda") is None
        assert choose(256, 50, 512, torch.float16, kernels.gpu_of("cuda")).design == "rows"


@pytest.mark.parametrize("form", ["reference", "cpu", "triton",
                                  pytest.param("triton-split", marks=needs_clusters)])
def test_split_sequence_equals_full(form):
    """In fp32 the state handed across the cut is the exact fp32 state, and every form runs
    the same operations step by step: two calls equal one, bit for bit. (The split kernel's
    dot reads h back from y, which in fp32 is the state itself.)"""
    fn = {"reference": reference_cfc_scan, "cpu": cpu_cfc_scan,
          "triton": lambda *a: triton_cfc_scan(*a, out=poisoned(a[0])),
          "triton-split": lambda *a: triton_cfc_scan(
              *a, out=poisoned(a[0]), plan=split_plan(2, 2, 48, torch.float32, block_n=16))}[form]
    device = DEVICE if form.startswith("triton") else "cpu"
    H = 48 if form == "triton-split" else 12      # three column blocks of 16
    xw, h0, w_rec, tau = make(2, 97, H, torch.float32, device, seed=3)
    full = fn(xw, h0, w_rec, tau, 1.0)
    cut = 40
    a = fn(xw[:, :cut], h0, w_rec, tau, 1.0)
    b = fn(xw[:, cut:], a[:, -1], w_rec, tau, 1.0)
    assert torch.equal(torch.cat([a, b], 1), full)


def test_gain_keeps_its_digits_for_large_tau():
    """With w_rec = 0, h0 = 0 and T = 1, y = (1 - a) tanh(xw): the gain ``1 - exp(-dt/tau)``
    of every form must be -expm1 accurate (2e-6 leaves room for the GPU's approximate exp)
    from dt/tau = 100 (a underflows) down to 1e-6, where ``1 - exp`` in fp32 would be off by
    percents."""
    tau = torch.logspace(-2, 6, 48)
    H, dt = tau.numel(), 1.0
    xw = torch.full((1, 1, H), 0.5)
    h0 = torch.zeros(1, H)
    w_rec = torch.zeros(H, H)
    expected = -torch.expm1(-dt / tau.double()) * math.tanh(0.5)
    forms = {"reference": reference_cfc_scan(xw, h0, w_rec, tau, dt),
             "cpu": cpu_cfc_scan(xw, h0, w_rec, tau, dt),
             "triton": triton_cfc_scan(*(a.to(DEVICE) for a in (xw, h0, w_rec, tau)), dt,
                                       out=poisoned(xw.to(DEVICE)))}
    if DEVICE == "cuda":   # three column blocks of 16
        forms["triton-split"] = triton_cfc_scan(*(a.cuda() for a in (xw, h0, w_rec, tau)), dt,
                                                out=poisoned(xw.cuda()),
                                                plan=split_plan(1, 1, H, torch.float32,
                                                                block_n=16))
    for name, y in forms.items():
        err = ((y[0, 0].double().cpu() - expected) / expected).abs().max()
        assert err < 2e-6, (name, float(err))


# -- torch integration ---------------------------------------------------------------------
def test_fake_tensor_and_export_see_one_opaque_op():
    args = make(2, 9, 4, torch.float32)

    class Wrap(torch.nn.Module):
        def forward(self, xw, h0, w_rec, tau):
            return cfc_scan(xw, h0, w_rec, tau, 0.5)

    program = torch.export.export(Wrap(), tuple(args))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in calls] == ["seqdeploy.cfc_scan.default"]
    assert calls[0].args[-1] == 0.5                       # dt is carried as a constant
    from torch._subclasses.fake_tensor import FakeTensorMode

    half = [a.half() for a in args[:3]] + [args[3]]     # tau stays fp32
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in half]
        y = cfc_scan(*fake, 1.0)
        assert y.shape == (2, 9, 4) and y.dtype == torch.float16


def test_torch_compile_keeps_the_op_whole():
    args = make(2, 33, 4, torch.float32)
    out, seen = compile_and_trace(lambda *a: cfc_scan(*a, 1.0), *args)
    assert "seqdeploy.cfc_scan.default" in seen
    assert rel_l2(out, naive_cfc_scan(*args, 1.0)) < TOL[torch.float32]


def test_model_uses_reference_under_reference_ops(monkeypatch):
    """The torch-ref engine's switch reaches this op: the model calls it through CustomOp."""
    from seqdeploy_cfc import CfC
    from seqdeploy_cfc.model import CFC_SCAN

    arch = CfC()
    config = arch.config("tiny")
    torch.manual_seed(0)
    model = arch.build(config).eval()
    inputs = arch.make_inputs(config, 2, 17, seed=1)
    calls = []
    monkeypatch.setattr(CFC_SCAN, "reference", lambda *a: calls.append(1) or reference_cfc_scan(*a))
    with torch.no_grad():
        kernel = model(inputs["x"], inputs["h"])
        with reference_ops():
            ref = model(inputs["x"], inputs["h"])
    assert len(calls) == config["n_layers"]
    for k, r in zip(kernel, ref):
        assert rel_l2(k, r.double()) < TOL[torch.float32]


def test_model_streams_state_across_calls():
    from seqdeploy_cfc import CfC

    arch = CfC()
    config = arch.config("tiny")
    torch.manual_seed(0)
    model = arch.build(config).eval()
    inputs = arch.make_inputs(config, 3, 30, seed=2)
    x, h = inputs["x"], inputs["h"]
    with torch.no_grad():
        y, h_out = model(x, h)
        y1, h1 = model(x[:, :11], h)
        y2, h2 = model(x[:, 11:], h1)
    assert torch.equal(torch.cat([y1, y2], 1), y) and torch.equal(h2, h_out)
    assert h_out.shape == (3, config["n_layers"], config["hidden"])


def test_presets_and_op_benchmark():
    from seqdeploy_cfc import CfC

    arch = CfC()
    assert arch.bench_shapes(arch.config("seed")) == [(32, 10), (64, 50), (128, 100)]
    assert arch.bench_shapes(arch.config("seed512")) == [(256, 50)]
    config = arch.config("tiny")
    (case,) = arch.op_benchmarks(config, 3, 5, torch.float32, "cpu")
    assert case.op == "cfc_scan" and case.bytes_moved == 4 * (2 * 3 * 5 * 16 + 16 * 16 + 3 * 16 + 16)
    assert case.call().shape == (3, 5, 16)


# -- ONNX ----------------------------------------------------------------------------------
def single_node_model(dtype: int, dt: float) -> onnx.ModelProto:
    """One CfCScan node plus the fallback function, opset 20, dynamic B and T."""
    dims = {"xw": ["B", "T", "H"], "h0": ["B", "H"], "w_rec": ["H", "H"], "tau": ["H"], "y": ["B", "T", "H"]}
    info = lambda n, t: helper.make_tensor_value_info(n, t, dims[n])  # noqa: E731
    node = helper.make_node("CfCScan", ["xw", "h0", "w_rec", "tau"], ["y"], domain=DOMAIN, dt=dt,
                            plugin_namespace="seqdeploy", plugin_version="1")
    graph = helper.make_graph([node], "cfc", [info("xw", dtype), info("h0", dtype),
                                              info("w_rec", dtype), info("tau", TensorProto.FLOAT)],
                              [info("y", dtype)])
    # IR 10, as the exporter writes: onnx 1.23's default (14) is newer than ORT 1.30 reads
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                                   helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(cfc_scan_function(20))
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto, xw, h0, w_rec, tau) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"xw": xw.numpy(), "h0": h0.numpy(), "w_rec": w_rec.numpy(), "tau": tau.numpy()}
    return torch.from_numpy(np.ascontiguousarray(session.run(None, feeds)[0]))


def test_fallback_function_is_standard_ops_with_a_scan():
    fn = cfc_scan_function(20)
    assert {n.domain for n in fn.node} <= {"", "ai.onnx"}
    assert [n.op_type for n in fn.node].count("Scan") == 1
    assert list(fn.attribute) == ["plugin_namespace", "plugin_version", "dt"]
    (dt_node,) = [n for n in fn.node if n.op_type == "Constant" and n.attribute[0].ref_attr_name]
    assert dt_node.attribute[0].ref_attr_name == "dt"


# bf16 is left out: ORT's CPU provider has no bf16 kernels for these ops
@pytest.mark.parametrize("dtype,onnx_dtype", [(torch.float32, TensorProto.FLOAT),
                                              (torch.float16, TensorProto.FLOAT16)], ids=str)
@pytest.mark.parametrize("B,T,H", [(1, 1, 5), (3, 63, 20)])
def test_onnx_fallback_matches_naive(B, T, H, dtype, onnx_dtype):
    xw, h0, w_rec, tau = make(B, T, H, dtype, seed=7)
    y = run_ort(single_node_model(onnx_dtype, 0.7), xw, h0, w_rec, tau)
    assert y.dtype == dtype and y.shape == (B, T, H)
    assert rel_l2(y, naive_cfc_scan(xw, h0, w_rec, tau, 0.7)) < TOL[dtype]


def test_onnx_fallback_gain_keeps_its_digits():
    """The function's Kahan expm1 (ONNX has no Expm1), over dt/tau from 100 to 1e-6."""
    tau = torch.logspace(-2, 6, 48)
    H = tau.numel()
    y = run_ort(single_node_model(TensorProto.FLOAT, 1.0), torch.full((1, 1, H), 0.5),
                torch.zeros(1, H), torch.zeros(H, H), tau)
    expected = -torch.expm1(-1.0 / tau.double()) * math.tanh(0.5)
    assert ((y[0, 0].double() - expected) / expected).abs().max() < 1e-6


# -- the whole pipeline ----------------------------------------------------------------------
def test_run_end_to_end_on_cpu(tmp_path, capsys):
    code, out, err = run_cli(["--out", tmp_path, "--device", "cpu", "run", "cfc", "--preset", "tiny",
                              "--long-seq", "256"], capsys)
    assert code == 0, err[-2000:]
    folder = tmp_path / "cfc" / "tiny"
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"]
    # every engine runs, except one that cannot load here, which is left out with its reason
    # (`ort` on a machine that can neither build nor find its op library: the GPU machine)
    ran = {c["engine"] for c in parity["checks"]}
    assert ran | set(parity["skipped"]) == {"torch", "ort", "ort-onnx"}
    assert {"torch", "ort-onnx"} <= ran and all(parity["skipped"].values())
    assert {(c["engine"], c["precision"]) for c in parity["checks"]} == \
        {(e, p) for e in ran for p in ("fp32", "fp16")}
    assert {"B1-T1", "B2-T63", "B2-T64", "B1-T256", "B2-T64-split33"} <= \
        {c["case"] for c in parity["checks"]}
    for name in ("model.onnx", "model.fp16.onnx"):
        model = onnx.load(str(folder / name))
        custom = [n for n in model.graph.node if n.domain == DOMAIN]
        assert [n.op_type for n in custom] == ["CfCScan", "CfCScan"]        # n_layers = 2
        assert all({a.name: a for a in n.attribute}["dt"].f == 1.0 for n in custom)
        assert not [n for n in model.graph.node if n.op_type in ("Loop", "Scan")]
        assert [f.name for f in model.functions] == ["CfCScan"]
    bench = json.loads((folder / "bench.json").read_text())
    assert {r["engine"] for r in bench["engines"]} == {"torch-ref"} | ran
    assert [o["op"] for o in bench["ops"]] == ["cfc_scan"]


# -- GPU ----
def wgmma_plan(B, H, dtype, **change) -> LaunchPlan:
    """The dispatch's wgmma plan (chosen at H of 129 to 512) for any H of 64 to 512."""
    block_h = max(16, 1 << (H - 1).bit_length())
    plan = choose(B, 2, max(block_h, 256), dtype, kernels.gpu_of("cuda"))
    assert plan.design == "wgmma", plan
    return dataclasses.replace(plan, block_h=block_h, block_n=min(plan.block_n, block_h),
                               num_warps=min(plan.block_n, block_h) // 16, **change)


def every_plan(B, T, H, dtype) -> dict[str, LaunchPlan]:
    """Each design this GPU can run on ``[B, T, H]``: rows (w_rec on chip where it fits, and
    streamed), split (as clusters, or a single step) and wgmma."""
    rows = rows_plan(B, H, dtype)
    plans = {"rows-streamed": dataclasses.replace(rows, w_resident=False)}
    if rows.block_h ** 2 * torch.finfo(dtype).bits // 8 <= kernels.W_RESIDENT_BYTES:
        plans["rows-resident"] = dataclasses.replace(rows, w_resident=True)
    if T == 1 or clusters_here():
        plans["split"] = split_plan(B, T, H, dtype)
    if wgmma_here() and dtype != torch.float32 and 64 <= H <= 512:
        plans["wgmma"] = wgmma_plan(B, H, dtype)
    return plans


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H", [(64, 512, 256), (40, 512, 512), (5, 512, 20), (5, 1, 200),
                                   (33, 1, 512)])
def test_cuda_op_and_every_design_match_naive(B, T, H, dtype):
    """The registered op on CUDA runs the plan ``choose`` makes for this GPU; repeated calls
    (the second through the launch kept ready) agree exactly, and every design this GPU can
    run agrees with the oracle, NaN-poisoned."""
    args = make(B, T, H, dtype, "cuda", seed=9, strided=True)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = cfc_scan(*args, 1.0)
    assert out.is_cuda and out.dtype == dtype
    assert rel_l2(out, ref) < TOL[dtype]
    assert torch.equal(out, cfc_scan(*args, 1.0))
    chosen = choose(B, T, H, dtype, kernels.gpu_of("cuda"))
    assert torch.equal(out, triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=chosen))
    for name, plan in every_plan(B, T, H, dtype).items():
        y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
        assert rel_l2(y, ref) < TOL[dtype], name


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H", [(1, 256), (5, 200), (33, 512)])
def test_single_step_runs_split(B, H, dtype):
    """A single step (a streaming step) runs split without clusters by default where its grid
    fits on the SMs: right, equal to the op's result, and within tolerance of rows."""
    args = make(B, 1, H, dtype, "cuda", seed=4, strided=H == 200)
    plan = choose(B, 1, H, dtype, kernels.gpu_of("cuda"))
    assert (plan.design, plan.cluster) == ("split", False)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]))
    assert rel_l2(y, ref) < TOL[dtype]
    assert torch.equal(cfc_scan(*args, 1.0), y)
    rows = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=rows_plan(B, H, dtype))
    assert rel_l2(rows, ref) < TOL[dtype]


SPLIT_SHAPES = [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512), (20, 33, 200)]


@needs_clusters
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H", SPLIT_SHAPES)
def test_cluster_split_matches_naive(B, T, H, dtype):
    """The cluster split kernel at the seed's four points and an odd shape (H=200: a partial
    last column block, padded rows, strided inputs), NaN-poisoned, with w_rec as the
    dispatch keeps it (and streamed where that is on chip); repeated launches agree bit for
    bit (a read of y before its writer's store would show up as a NaN or a mismatch)."""
    args = make(B, T, H, dtype, "cuda", seed=11, strided=H == 200)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    default = split_plan(B, T, H, dtype)
    for plan in [default] + [dataclasses.replace(default, w_resident=False)] * default.w_resident:
        out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
        assert rel_l2(out, ref) < TOL[dtype], plan
        for _ in range(3):
            assert torch.equal(triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan),
                               out), plan


@needs_clusters
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_b,block_n,num_warps,w_resident",
                         [(16, 32, 4, True), (16, 64, 8, True), (32, 32, 4, False),
                          (64, 32, 8, True), (16, 128, 8, False), (16, 32, 2, True)])
def test_cluster_split_tilings_agree(block_b, block_n, num_warps, w_resident, dtype):
    """Other tilings of the cluster split change the work split, not the result (70 rows:
    a partial batch block; H=192: a partial column block at every block_n but 64)."""
    args = make(70, 21, 192, dtype, "cuda", seed=12)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    plan = split_plan(70, 21, 192, dtype, block_b=block_b, block_n=block_n,
                      num_warps=num_warps, w_resident=w_resident)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
    assert rel_l2(out, ref) < TOL[dtype]


@needs_clusters
def test_cluster_split_runs_any_grid():
    """Clusters are scheduled whole, so a grid of more programs than SMs (4 per SM here:
    16 * SMs rows in column blocks of 16 at H=64) runs and is right."""
    sms = kernels.gpu_of("cuda").sms
    args = make(16 * sms, 2, 64, torch.float16, "cuda")
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                          plan=split_plan(16 * sms, 2, 64, torch.float16, block_n=16))
    assert rel_l2(out, naive_cfc_scan(*cpu(args), 1.0)) < TOL[torch.float16]


@needs_wgmma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,H", SPLIT_SHAPES + [(37, 13, 500), (5, 3, 300), (19, 6, 100),
                                                  (3, 1, 512), (7, 5, 64), (9, 301, 512),
                                                  (33, 2, 256)])
def test_wgmma_design_matches_naive(B, T, H, dtype):
    """The wgmma design (``wgmma.py``) at the seed's four points and odd shapes (padded rows
    and columns, strided inputs, H=100, a single step, one program per cluster at H=64, 301
    steps: each mbarrier through 150 phases, two steps: one exchange), NaN-poisoned: within
    the dtype's tolerance of the float64 loop, and repeated launches bit for bit equal. The
    Triton cluster split meets the same tolerance on the same inputs."""
    args = make(B, T, H, dtype, "cuda", seed=21, strided=H % 16 != 0)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    plan = wgmma_plan(B, H, dtype)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
    assert rel_l2(out, ref) < TOL[dtype]
    for _ in range(3):
        assert torch.equal(triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan), out)
    if H >= 64 and T > 1:
        split = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                                plan=split_plan(B, T, H, dtype))
        assert rel_l2(split, ref) < TOL[dtype]
    if H == 512:   # block_n 64: 8 programs per cluster, 4 warps
        y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                            plan=dataclasses.replace(plan, block_n=64, num_warps=4))
        assert rel_l2(y, ref) < TOL[dtype]


@needs_wgmma
@pytest.mark.parametrize("B,T,H", [(64, 50, 300), (40, 9, 512)])
def test_wgmma_design_is_the_default(B, T, H):
    """The registered op runs the wgmma design at H of 129 to 512 over several steps: the
    first call through the full launch, the next ones through the launch kept ready, all bit
    for bit equal to the plan passed explicitly."""
    args = make(B, T, H, torch.float16, "cuda", seed=22)
    assert choose(B, T, H, torch.float16, kernels.gpu_of("cuda")).design == "wgmma"
    asked = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                            plan=choose(B, T, H, torch.float16, kernels.gpu_of("cuda")))
    launcher = kernels.launcher("wgmma")
    for _ in range(3):
        before = launcher.fast_calls
        assert torch.equal(cfc_scan(*args, 1.0), asked)
        assert launcher.fast_calls == before + 1
    assert rel_l2(asked, naive_cfc_scan(*cpu(args), 1.0)) < TOL[torch.float16]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("design", ["rows", "split", "wgmma"])
def test_hardware_tanh_stays_within_the_dtype_tolerance(design, dtype):
    """fp16/bf16 on a GPU use ``tanh.approx.f32`` by default: over a long sequence (T=2048,
    a contractive and an expansive w_rec) it stays within the same tolerance as the exact
    tanh, and not far from it."""
    if design == "split" and not clusters_here() or design == "wgmma" and not wgmma_here():
        pytest.skip(f"{design} does not run on this GPU")
    plan = {"rows": lambda: rows_plan(24, 96, dtype),
            "split": lambda: split_plan(24, 2048, 96, dtype),
            "wgmma": lambda: wgmma_plan(24, 96, dtype)}[design]()
    assert plan.fast_tanh
    for seed, w_scale in ((13, 1.0), (14, 1.5)):
        args = make(24, 2048, 96, dtype, "cuda", seed=seed, w_scale=w_scale)
        ref = naive_cfc_scan(*cpu(args), 1.0)
        fast = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), plan=plan)
        exact = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),
                                plan=dataclasses.replace(plan, fast_tanh=False))
        assert rel_l2(fast, ref) < TOL[dtype]
        assert rel_l2(fast, ref) < 2 * rel_l2(exact, ref) + 1e-4
