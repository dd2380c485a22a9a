"""cfc_scan: float64 naive loop vs step-loop reference vs CPU op vs Triton vs the ONNX fallback,
then the `cfc` model through the whole pipeline.

Triton runs through its interpreter on CPU-only machines and for real on a GPU. Outputs are
poisoned with NaN before each kernel runs, so an unwritten element fails the test. The split
kernel (each step waits for the sibling programs' previous step) cannot run in the
interpreter, which runs programs one after another: on CPU it runs only where no program
waits on another (one column block, or one step per launch), and its real launches are GPU
tests.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, compile_and_trace, gpu, run_cli
from onnx import TensorProto, helper

from seqdeploy.ops import DOMAIN, reference_ops
from seqdeploy_cfc import kernels
from seqdeploy_cfc.kernels import W_RESIDENT_BYTES, launch_config, triton_cfc_scan
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_resident", [True, False], ids=["w-resident", "w-streamed"])
@pytest.mark.parametrize("B,T,H,strided", [(2, 1, 16, False), (3, 63, 20, True),
                                           (19, 37, 40, False)])
def test_triton_matches_naive(B, T, H, strided, w_resident, dtype):
    """Odd H (padded to a power of two >= 16), B above one 16-row block, both homes of w_rec
    (the streamed one with two contraction slices at H=40: block_k 32 of block_h 64)."""
    args = make(B, T, H, dtype, DEVICE, strided=strided)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), w_resident=w_resident,
                          method="rows")
    assert out.dtype == dtype
    assert rel_l2(out, ref) < TOL[dtype]


@pytest.mark.parametrize("block_b,num_warps,block_k", [(32, 2, 16), (64, 4, 64)])
def test_triton_launch_variants_agree(block_b, num_warps, block_k):
    """The --sweep knobs change the tiling, not the result."""
    args = make(40, 9, 48, torch.float32, DEVICE, seed=4)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    for w_resident in (True, False):
        out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), block_b=block_b,
                              num_warps=num_warps, w_resident=w_resident, block_k=block_k,
                              method="rows")
        assert rel_l2(out, ref) < TOL[torch.float32]


def test_triton_long_sequence():
    """T = 1000 (in the interpreter with few units: it emulates every element)."""
    B, T, H = (2, 1000, 24) if DEVICE == "cpu" else (8, 4096, 256)
    args = make(B, T, H, torch.float32, DEVICE, seed=5, w_scale=1.5)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]))
    assert rel_l2(out, ref) < TOL[torch.float32]


# -- the split kernel ------------------------------------------------------------------------
def run_split(args, dt, out, **overrides):
    """The split kernel through its launcher, which (unlike ``triton_cfc_scan``) lets the
    interpreter run it where no program waits on another: one column block, or one step."""
    B, T, H = args[0].shape
    xw, h0, w_rec, tau, y = kernels._prepare(*args, out)
    config = launch_config(B, H, xw.dtype, method="split")
    config.update(overrides)
    compiled = xw.is_cuda and not kernels._INTERPRETED
    plan = kernels._make_plan(B, H, xw.dtype, compiled, xw.get_device() if compiled else -1,
                              config)
    kernels._launch_split(xw, h0, w_rec, tau, y, dt, plan)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_resident", [True, False], ids=["w-resident", "w-streamed"])
@pytest.mark.parametrize("B,T,H,strided", [(2, 1, 16, False), (3, 63, 20, True),
                                           (19, 37, 40, False)])
def test_split_kernel_one_column_block_matches_naive(B, T, H, strided, w_resident, dtype):
    """The split kernel's arithmetic, with block_n = block_h: one column block per batch
    block, so each program waits only for its own stores and the interpreter can run it
    (19 rows: two batch blocks; H=40: two contraction slices when streamed)."""
    args = make(B, T, H, dtype, DEVICE, strided=strided)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = run_split(args, 1.0, poisoned(args[0]), block_n=kernels._block_h(H),
                    w_resident=w_resident, num_warps=4)
    assert out.dtype == dtype
    assert rel_l2(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,block_n", [(3, 63, 20, 32), (19, 37, 40, 64), (19, 1, 40, 16)])
def test_split_kernel_half_k_dots_match_naive(B, T, H, block_n, dtype):
    """``k_split=2``: the step's dot as two dots over the halves of the contraction axis,
    each half of h read on its own (H=20 and 40: the second half partly or wholly padded;
    three column blocks for a single step)."""
    args = make(B, T, H, dtype, DEVICE, seed=9, strided=True)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = run_split(args, 1.0, poisoned(args[0]), block_n=block_n, w_resident=True,
                    num_warps=4, k_split=2)
    assert rel_l2(out, ref) < TOL[dtype]
    for bad, H in [({"k_split": 3, "w_resident": True}, 40),
                   ({"k_split": 2, "w_resident": False}, 40),
                   ({"k_split": 2, "w_resident": True}, 16)]:     # halves of 8: too small
        with pytest.raises(ValueError, match="k_split"):
            run_split(make(2, 1, H, dtype, DEVICE), 1.0, None, **bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_resident", [True, False], ids=["w-resident", "w-streamed"])
def test_split_kernel_column_blocks_one_step_per_call(w_resident, dtype):
    """Several column blocks (H=40 in blocks of 16: the last one partial) and batch blocks,
    one step per launch, so nothing is waited for and the interpreter can run it; in fp32
    the state handed from call to call is exact, so 6 chained calls are the 6-step scan."""
    B, T, H = 19, 6, 40
    args = make(B, T, H, dtype, DEVICE, seed=6, strided=True)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    xw, h, w_rec, tau = args
    steps = []
    for t in range(T if dtype == torch.float32 else 1):
        y = run_split((xw[:, t:t + 1], h, w_rec, tau), 1.0, poisoned(xw[:, :1]), block_n=16,
                      w_resident=w_resident, num_warps=4)
        steps.append(y)
        h = y[:, 0]
    out = torch.cat(steps, 1)
    assert rel_l2(out, ref[:, :out.shape[1]]) < TOL[dtype]


def test_split_refused_where_it_could_hang():
    """In the interpreter (and on CPU tensors) programs run one after another, so a program
    would wait forever for a sibling: the split kernel says so instead of hanging."""
    args = make(20, 5, 40, torch.float32)            # CPU tensors, whatever the machine has
    with pytest.raises(RuntimeError, match="interpreter"):
        triton_cfc_scan(*args, 1.0, method="split")
    with pytest.raises(RuntimeError, match="interpreter"):
        run_split(args, 1.0, poisoned(args[0]), block_n=16)     # 3 column blocks, 5 steps
    with pytest.raises(ValueError, match="method"):
        triton_cfc_scan(*args, 1.0, method="columns")
    assert launch_config(20, 40, torch.float32, "cpu")["method"] == "rows"


def test_launch_config_picks_split_where_rows_loses(monkeypatch):
    """On a 132-SM GPU (an H200): rows wherever it keeps w_rec on chip (it measured faster than
    split at every H=256 seed point), split wherever rows would stream w_rec from L2, never a
    split grid with more programs than SMs (the exchange's co-residency condition)."""
    monkeypatch.setattr(kernels, "sm_count",
                        lambda device: 132 if torch.device(device).type == "cuda" else None)
    monkeypatch.setattr(kernels, "clusters_available", lambda device: False)

    def pick(B, H, dtype=torch.float16):
        config = launch_config(B, H, dtype, "cuda")
        if config["method"] == "split":
            n_bb, n_nb = kernels.split_grid(B, H, config["block_b"], config["block_n"])
            assert n_nb >= 2 and n_bb * n_nb <= 132
        return config

    for B in (32, 64, 128):
        assert pick(B, 256)["method"] == "rows"
    for B, H in [(256, 512), (1, 512)]:
        for dtype in DTYPES:
            assert pick(B, H, dtype)["method"] == "split", (B, H, dtype)
    seed512 = pick(256, 512)
    assert (seed512["block_b"], seed512["block_n"], seed512["w_resident"]) == (16, 64, True)
    assert pick(256, 512, torch.float32)["block_b"] == 32           # 8 x 16 programs
    assert pick(8192, 512)["method"] == "rows"                      # no split grid fits
    assert pick(4096, 32)["method"] == "rows"                       # w_rec fits, H small
    assert launch_config(256, 512, torch.float16, "cpu")["method"] == "rows"
    assert launch_config(256, 512, torch.float16)["method"] == "rows"
    # one step (streaming): split wherever its grid fits, rows where it does not
    for B in (1, 32, 128):
        for dtype in DTYPES:
            assert launch_config(B, 256, dtype, "cuda", T=1)["method"] == "split", (B, dtype)
        assert launch_config(B, 256, torch.float16, "cuda", T=10)["method"] == "rows"
    assert launch_config(8192, 256, torch.float16, "cuda", T=1)["method"] == "rows"
    assert launch_config(1, 256, torch.float16, "cpu", T=1)["method"] == "rows"


@pytest.fixture(params=[False, True], ids=["wgmma-on-request", "wgmma-by-default"])
def wgmma_by_default(request, monkeypatch):
    """``kernels.WGMMA_BY_DEFAULT`` set both ways, with the memoised configs, plans and
    kept-ready launches cleared around."""
    def clear():
        kernels._launch_config.cache_clear()
        kernels._default_plan.cache_clear()
        kernels._READY.clear()

    monkeypatch.setattr(kernels, "WGMMA_BY_DEFAULT", request.param)
    clear()
    yield request.param
    monkeypatch.undo()
    clear()


def test_launch_config_with_clusters(monkeypatch, wgmma_by_default):
    """Where thread-block clusters are available (Hopper on): split as clusters for H >= 256
    over several steps, whatever the batch (clusters need no co-residency). In fp16/bf16,
    where the wgmma form runs (compute capability 9.x, Gluon), asked for (``wgmma=True``):
    4 programs of 64 columns (4 warps) at H of 129 to 256, of 128 (8 warps) at H of 257 to
    512; with ``WGMMA_BY_DEFAULT``, also the default at H of 129 to 512. Otherwise
    (``wgmma=False``, fp32, a GPU where it cannot run) the Triton kernel: 8 programs of 32
    columns at H=256, 4 of 128 at H=512 in fp16/bf16 and 8 of 64 in fp32; rows below
    H=256; a single step keeps the cluster-less tiling (nobody waits) unless the wgmma form
    is asked for, as does a small H."""
    monkeypatch.setattr(kernels, "sm_count",
                        lambda device: 132 if torch.device(device).type == "cuda" else None)
    monkeypatch.setattr(kernels, "clusters_available",
                        lambda device: torch.device(device).type == "cuda")
    monkeypatch.setattr(kernels, "wgmma_runs", lambda device: torch.device(device).type ==
                        "cuda" and kernels.wgmma_available())
    for B in (1, 32, 64, 128, 256, 8192):
        for H, dtype, block_n, wgmma_n in [(256, torch.float16, 32, 64),
                                           (512, torch.float16, 128, 128),
                                           (512, torch.bfloat16, 128, 128),
                                           (512, torch.float32, 64, None),
                                           (200, torch.float16, 32, 64)]:
            config = launch_config(B, H, dtype, "cuda", T=50, wgmma=False)
            assert (config["method"], config["cluster"], config["block_b"],
                    config["block_n"], config["wgmma"]) == ("split", True, 16, block_n,
                                                            False), (B, H, dtype)
            # fp32 at H=512 streams its slice (on chip, ptxas spills the FMA dot's tiles)
            assert config["w_resident"] == (dtype != torch.float32), (B, H, dtype)
            # two half-K dots at H=512 in fp16 / bf16
            assert config["k_split"] == (2 if block_n == 128 else 1), (B, H, dtype)
            n_nb = kernels.split_grid(B, H, 16, block_n)[1]
            assert 2 <= n_nb <= kernels.MAX_CLUSTER
            default = launch_config(B, H, dtype, "cuda", T=50)
            if wgmma_n is None or not kernels.wgmma_available():
                assert default == config, (B, H, dtype)
                continue
            asked = launch_config(B, H, dtype, "cuda", T=50, wgmma=True)
            by_default = wgmma_by_default and kernels._block_h(H) in kernels.WGMMA_BLOCK_H
            assert default == (asked if by_default else config), (B, H, dtype)
            assert (asked["method"], asked["cluster"], asked["block_b"],
                    asked["block_n"], asked["num_warps"], asked["wgmma"],
                    asked["k_split"]) == ("split", True, 16, wgmma_n, wgmma_n // 16, True,
                                          1), (B, H, dtype)
            assert 3 <= kernels.split_grid(B, H, 16, wgmma_n)[1] <= 4
    if kernels.wgmma_available():
        one = launch_config(32, 512, torch.float16, "cuda", T=1, wgmma=True)
        assert (one["cluster"], one["wgmma"], one["block_n"]) == (True, True, 128)
        small = launch_config(32, 100, torch.float16, "cuda", T=9, wgmma=True)   # not rows
        assert (small["method"], small["wgmma"], small["block_n"]) == ("split", True, 64)
    monkeypatch.setattr(kernels, "wgmma_runs", lambda device: False)   # e.g. sm_100
    assert not launch_config(32, 512, torch.float16, "cuda", T=9).get("wgmma")
    assert launch_config(64, 128, torch.float16, "cuda", T=50)["method"] == "rows"
    assert launch_config(64, 512, torch.float16, "cpu", T=50)["method"] == "rows"
    one = launch_config(32, 512, torch.float16, "cuda", T=1)
    assert (one["method"], one["cluster"], one["block_n"]) == ("split", False, 64)
    forced = launch_config(64, 128, torch.float16, "cuda", method="split", T=50)
    assert forced["cluster"] and forced["block_n"] == 16


@pytest.mark.parametrize("form", ["reference", "cpu", "triton",
                                  pytest.param("triton-split", marks=gpu)])
def test_split_sequence_equals_full(form):
    """In fp32 the state handed across the cut is the exact fp32 state, and every form runs
    the same operations step by step: two calls equal one, bit for bit. (The split kernel's
    dot reads h back from y, which in fp32 is the state itself.)"""
    fn = {"reference": reference_cfc_scan, "cpu": cpu_cfc_scan,
          "triton": lambda *a: triton_cfc_scan(*a, out=poisoned(a[0])),
          "triton-split": lambda *a: triton_cfc_scan(*a, out=poisoned(a[0]), method="split",
                                                     block_n=16)}[form]
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
                                                out=poisoned(xw.cuda()), method="split",
                                                block_n=16)
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
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
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
    assert {(c["engine"], c["precision"]) for c in parity["checks"]} == \
        {("torch", "fp32"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16"),
         ("ort-onnx", "fp32"), ("ort-onnx", "fp16")}
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
    assert {r["engine"] for r in bench["engines"]} == {"torch-ref", "torch", "ort", "ort-onnx"}
    assert [o["op"] for o in bench["ops"]] == ["cfc_scan"]


# -- GPU -------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H", [(64, 256), (40, 512), (5, 20)])
def test_cuda_dispatch_runs_triton_at_512(B, H, dtype):
    """The registered op on CUDA is the Triton kernel ``launch_config`` picks (split at
    B=64 H=256 and at H=512, rows at H=20); repeated launches agree exactly, and every design
    it could have picked agrees with the oracle: rows with w_rec on chip (where it fits) or
    streamed from L2, and split."""
    args = make(B, 512, H, dtype, "cuda", seed=9, strided=True)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    out = cfc_scan(*args, 1.0)
    assert out.is_cuda and out.dtype == dtype
    assert rel_l2(out, ref) < TOL[dtype]
    assert torch.equal(out, cfc_scan(*args, 1.0))
    too_big = H * H * args[2].element_size() > W_RESIDENT_BYTES   # cannot stay on one SM
    for w_resident in (True, False):   # both homes of w_rec, whichever the default picked
        if w_resident and too_big:
            continue
        y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), w_resident=w_resident,
                            method="rows")
        assert rel_l2(y, ref) < TOL[dtype]
    y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method="split")
    assert rel_l2(y, ref) < TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H", [(1, 256), (5, 200), (33, 512)])
def test_single_step_takes_split_without_the_fill(B, H, dtype):
    """A single step (a streaming step) runs split by default on CUDA, and split skips the
    all-ones fill of y when T == 1 (step 0 waits for nobody): outputs poisoned with NaN and
    with the all-ones "not arrived" pattern itself both come out as the oracle's values, as
    do those of rows."""
    args = make(B, 1, H, dtype, "cuda", seed=4, strided=H == 200)
    split = launch_config(B, H, dtype, "cuda", method="split")
    n_bb, n_nb = kernels.split_grid(B, H, split["block_b"], split["block_n"])
    if n_bb * n_nb > kernels.sm_count("cuda"):
        pytest.skip(f"a {n_bb} x {n_nb} split grid does not fit this GPU")
    assert launch_config(B, H, dtype, "cuda", T=1)["method"] == "split"

    def fills(xw):   # aten::fill_ calls (the split fill) in one launch
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            triton_cfc_scan(xw, *args[1:], 1.0, method="split")
        return sum(e.name == "aten::fill_" for e in prof.events())

    assert fills(args[0]) == 0
    # two steps: the cluster-less exchange fills y, the cluster barrier needs no fill
    assert fills(args[0].expand(B, 2, H)) == (0 if kernels.clusters_available("cuda") else 1)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    bits = {2: torch.int16, 4: torch.int32}[args[0].element_size()]
    all_ones = torch.full(args[0].shape, -1, dtype=bits, device="cuda").view(dtype)
    y = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]))
    assert rel_l2(y, ref) < TOL[dtype]
    assert torch.equal(triton_cfc_scan(*args, 1.0, out=all_ones), y)
    assert torch.equal(cfc_scan(*args, 1.0), y)                 # the registered op's path
    rows = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method="rows")
    assert rel_l2(rows, ref) < TOL[dtype]


SPLIT_SHAPES = [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512), (20, 33, 200)]


def _cluster_modes():
    """Both exchanges of the split kernel where this GPU has clusters, else the one it has."""
    has = torch.cuda.is_available() and kernels.clusters_available("cuda")
    return [True, False] if has else [False]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H", SPLIT_SHAPES)
def test_split_matches_naive(B, T, H, dtype):
    """The split kernel at the seed's four points and an odd shape (H=200: a partial last
    column block, padded rows, strided inputs), NaN-poisoned, with both exchanges (cluster
    barrier and flag-in-data); repeated launches agree bit for bit (a read of y before its
    writer's store would show up as a NaN or a mismatch), and the two exchanges agree bit
    for bit at a common tiling."""
    args = make(B, T, H, dtype, "cuda", seed=11, strided=H == 200)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    outs = {}
    for cluster in _cluster_modes():
        run = lambda **kw: triton_cfc_scan(*args, 1.0, out=poisoned(args[0]),  # noqa: E731
                                           method="split", cluster=cluster, **kw)
        out = outs[cluster] = run()
        assert out.dtype == dtype
        assert rel_l2(out, ref) < TOL[dtype], cluster
        for _ in range(5):
            assert torch.equal(run(), out), cluster
        common = {"block_b": 16, "block_n": 64 if H > 256 else 32}
        outs[cluster, "common"] = run(**common)
        if kernels._launch_config(B, H, dtype, kernels.sm_count("cuda"), "split", False,
                                  cluster)["w_resident"]:   # the dot as one or two half-K dots
            for k_split in (1, 2):
                assert rel_l2(run(k_split=k_split), ref) < TOL[dtype], (cluster, k_split)
    if len(outs) == 4:
        assert torch.equal(outs[True, "common"], outs[False, "common"])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_b,block_n,num_warps,w_resident",
                         [(16, 16, 4, True), (16, 64, 8, True), (32, 32, 4, False),
                          (64, 32, 8, True), (16, 128, 8, False), (16, 32, 2, True),
                          (16, 16, 1, True)])
def test_split_launch_variants_agree(block_b, block_n, num_warps, w_resident, dtype):
    """The --sweep knobs of the split kernel change the tiling, not the result (70 rows:
    a partial batch block; H=192: a partial column block at every block_n but 16, 64)."""
    args = make(70, 21, 192, dtype, "cuda", seed=12)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    for cluster in _cluster_modes():
        if cluster and -(-192 // block_n) > kernels.MAX_CLUSTER:
            with pytest.raises(RuntimeError, match="cluster"):
                triton_cfc_scan(*args, 1.0, method="split", block_n=block_n, cluster=True)
            continue
        out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method="split",
                              block_b=block_b, block_n=block_n, num_warps=num_warps,
                              w_resident=w_resident, cluster=cluster)
        assert rel_l2(out, ref) < TOL[dtype], cluster


@gpu
def test_split_refuses_more_programs_than_sms():
    """Without clusters, more programs than SMs could leave some unscheduled while the rest
    wait for their steps: an explicit request is refused, and the default falls back to
    rows. As clusters (which the GPU schedules whole), the same grid runs and is right."""
    sms = kernels.sm_count("cuda")
    args = make(16 * sms, 2, 64, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="SMs"):
        triton_cfc_scan(*args, 1.0, method="split", block_b=16, block_n=16, cluster=False)
    if kernels.clusters_available("cuda"):
        ref = naive_cfc_scan(*cpu(args), 1.0)
        out = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method="split", block_b=16,
                              block_n=16, cluster=True)          # 4 x sms programs
        assert rel_l2(out, ref) < TOL[torch.float16]
        assert launch_config(16 * sms, 512, torch.float16, "cuda")["method"] == "split"
    else:
        assert launch_config(16 * sms, 512, torch.float16, "cuda")["method"] == "rows"


def test_cluster_true_refused_without_clusters():
    """``cluster=True`` or ``wgmma=True`` where clusters cannot run (CPU tensors, the
    interpreter, pre-Hopper GPUs) is a one-line error, not a silent fallback."""
    args = make(4, 3, 32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="clusters"):
        triton_cfc_scan(*args, 1.0, cluster=True)
    with pytest.raises(RuntimeError, match="wgmma=True"):
        triton_cfc_scan(*make(4, 3, 256, torch.float16, "cpu"), 1.0, wgmma=True)


needs_wgmma = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.wgmma_runs("cuda")),
    reason="the wgmma form needs thread-block clusters, compute capability 9.x and Gluon")


@needs_wgmma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,H", SPLIT_SHAPES + [(37, 13, 500), (5, 3, 300), (19, 6, 100),
                                                  (3, 1, 512), (7, 5, 64), (9, 301, 512),
                                                  (33, 2, 256)])
def test_wgmma_form_matches_naive(B, T, H, dtype):
    """The wgmma form (``wgmma.py``) at the seed's four points and odd shapes (padded rows
    and columns, strided inputs, H=100, a single step, one program per cluster at H=64, 301
    steps: each mbarrier through 150 phases, two steps: one exchange), NaN-poisoned: within
    the dtype's
    tolerance of the float64 loop, and repeated launches bit for bit equal. The Triton
    cluster kernel (``wgmma=False``) meets the same tolerance on the same inputs."""
    args = make(B, T, H, dtype, "cuda", seed=21, strided=H % 16 != 0)
    ref = naive_cfc_scan(*cpu(args), 1.0)
    run = lambda **kw: triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), **kw)  # noqa: E731
    out = run(wgmma=True)
    assert rel_l2(out, ref) < TOL[dtype]
    for _ in range(3):
        assert torch.equal(run(wgmma=True), out)
    assert rel_l2(run(wgmma=False, method="split"), ref) < TOL[dtype]


@needs_wgmma
@pytest.mark.parametrize("B,T,H", [(64, 50, 300), (40, 9, 512)])
def test_wgmma_form_as_the_default(B, T, H, wgmma_by_default):
    """With ``WGMMA_BY_DEFAULT`` (and only then) the registered op runs the wgmma form at
    H of 129 to 512 over several steps, first through the full launch, then through the
    kept-ready one (``_READY``), both bit for bit equal to ``wgmma=True``; without it, the
    Triton kernel runs (and is kept ready) instead."""
    args = make(B, T, H, torch.float16, "cuda", seed=22)
    assert launch_config(B, H, torch.float16, "cuda", T=T)["wgmma"] == wgmma_by_default
    asked = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), wgmma=True)
    launcher = kernels._wgmma_launcher()
    full, clustered = [], launcher.clustered
    launcher.clustered = lambda *a, **k: full.append(1) or clustered(*a, **k)  # noqa: E731
    try:
        for i in range(3):   # the first call keeps its launch ready, the next ones use it
            before, full_before = launcher.fast_calls, len(full)
            y = cfc_scan(*args, 1.0)
            assert (launcher.fast_calls > before) == wgmma_by_default
            assert len(full) - full_before == (wgmma_by_default and i == 0)
            assert torch.equal(y, asked) or not wgmma_by_default
    finally:
        del launcher.clustered   # the class's method again
    # either form's launch is kept ready (the counts above tell which one ran)
    assert kernels._signature(*args, 1.0) in kernels._READY
    ref = naive_cfc_scan(*cpu(args), 1.0)
    assert rel_l2(y, ref) < TOL[torch.float16]


@needs_wgmma
def test_wgmma_form_refuses_what_it_cannot_run():
    """Tilings and inputs the wgmma form cannot run are one-line errors naming the limit."""
    half = make(20, 4, 512, torch.float16, "cuda")
    for kw in ({"block_n": 32}, {"block_n": 128, "num_warps": 4}, {"block_b": 32},
               {"k_split": 2}, {"w_resident": False}):
        with pytest.raises(ValueError, match="wgmma=True runs"):
            triton_cfc_scan(*half, 1.0, wgmma=True, **kw)
    with pytest.raises(ValueError, match="block_k"):
        triton_cfc_scan(*half, 1.0, wgmma=True, block_k=64)
    with pytest.raises(ValueError, match="wgmma=True runs"):
        triton_cfc_scan(*make(20, 4, 1024, torch.float16, "cuda"), 1.0, wgmma=True)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        triton_cfc_scan(*make(20, 4, 256, torch.float32, "cuda"), 1.0, wgmma=True)
    with pytest.raises(RuntimeError, match="wgmma=True"):
        triton_cfc_scan(*half, 1.0, wgmma=True, method="rows")
    with pytest.raises(RuntimeError, match="wgmma=True"):
        triton_cfc_scan(*half, 1.0, wgmma=True, cluster=False)
    # block_n 64 at H=512: 8 programs per cluster, 4 warps (the warps follow block_n)
    ref = naive_cfc_scan(*cpu(half), 1.0)
    out = triton_cfc_scan(*half, 1.0, out=poisoned(half[0]), wgmma=True, block_n=64)
    assert rel_l2(out, ref) < TOL[torch.float16]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["rows", "split"])
def test_hardware_tanh_stays_within_the_dtype_tolerance(method, dtype):
    """fp16/bf16 on a GPU use ``tanh.approx.f32`` by default: over a long sequence (T=2048,
    a contractive and an expansive w_rec) it stays within the same tolerance as the exact
    tanh, and not far from it."""
    for seed, w_scale in ((13, 1.0), (14, 1.5)):
        args = make(24, 2048, 96, dtype, "cuda", seed=seed, w_scale=w_scale)
        ref = naive_cfc_scan(*cpu(args), 1.0)
        fast = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method=method)
        exact = triton_cfc_scan(*args, 1.0, out=poisoned(args[0]), method=method,
                                fast_tanh=False)
        assert rel_l2(fast, ref) < TOL[dtype]
        assert rel_l2(fast, ref) < 2 * rel_l2(exact, ref) + 1e-4
