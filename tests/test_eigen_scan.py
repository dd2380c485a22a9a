"""eigen_scan: float64 naive loop vs step-loop reference vs vectorised CPU form vs Triton.

Triton runs through its interpreter on CPU-only machines and for real on a GPU. Outputs are
poisoned with NaN before each kernel runs, so an unwritten element fails the test.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, compile_and_trace, gpu

from seqdeploy_ten.kernels import triton_eigen_scan
from seqdeploy_ten.ops import (eigen_scan, naive_eigen_scan, reference_eigen_scan,
                               vectorised_eigen_scan)

# max rel-L2 against the float64 loop run on the same (already rounded) inputs
TOL = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, T, K, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:   # halves of one [B, T, 2K] projection, as the model passes them
        both = torch.randn(B, T, 2 * K, generator=g)
        x_re, x_im = both[..., :K], both[..., K:]
    else:
        x_re, x_im = torch.randn(B, T, K, generator=g), torch.randn(B, T, K, generator=g)
    magnitude = torch.empty(K).uniform_(0.9, 0.999, generator=g)
    nu = torch.log(-torch.log(magnitude))
    theta = torch.rand(K, generator=g) * math.pi
    h_re, h_im = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(x_re), cast(x_im), nu.to(device), theta.to(device), cast(h_re), cast(h_im)


def rel_l2(out, ref: torch.Tensor) -> float:
    y = torch.complex(out[0].double().cpu(), out[1].double().cpu())
    assert torch.isfinite(y).all(), "NaN/Inf in output (unwritten or overflowed)"
    return float((y - ref).abs().norm() / ref.abs().norm())


def poisoned(x: torch.Tensor):
    return (torch.full(x.shape, math.nan, dtype=x.dtype, device=x.device),
            torch.full(x.shape, math.nan, dtype=x.dtype, device=x.device))


def test_naive_loop_matches_closed_form():
    """The oracle itself: a constant input has the geometric-series solution."""
    B, T, K = 1, 50, 3
    nu = torch.tensor([-3.0, -1.0, 0.5], dtype=torch.float64)
    theta = torch.tensor([0.3, 2.0, 0.0], dtype=torch.float64)
    lam = torch.exp(-torch.exp(nu)) * torch.exp(1j * theta)
    x = torch.ones(B, T, K, dtype=torch.float64)
    h0 = torch.zeros(B, K, dtype=torch.float64)
    y = naive_eigen_scan(x, torch.zeros_like(x), nu, theta, h0, h0)
    t = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    expected = (1 - lam[None] ** t) / (1 - lam[None])
    assert torch.allclose(y[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,K", [(2, 1, 16), (3, 63, 20), (2, 300, 7)])
def test_cpu_forms_match_naive(B, T, K, dtype):
    args = make(B, T, K, dtype)
    ref = naive_eigen_scan(*args)
    assert rel_l2(reference_eigen_scan(*args), ref) < TOL[dtype]
    assert rel_l2(vectorised_eigen_scan(*args), ref) < TOL[dtype]
    out = eigen_scan(*args)            # the registered op: vectorised on CPU
    assert out[0].dtype == dtype and out[0].shape == (B, T, K)
    assert rel_l2(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,K,strided", [(2, 1, 16, False), (3, 63, 20, True), (2, 130, 8, False)])
def test_triton_matches_naive(B, T, K, strided, dtype):
    args = make(B, T, K, dtype, DEVICE, strided=strided)
    ref = naive_eigen_scan(*[a.cpu() for a in args])
    out = triton_eigen_scan(*args, out=poisoned(args[0]))
    assert rel_l2(out, ref) < TOL[dtype]


def test_triton_long_sequence():
    """T = 4096 (in the interpreter with few channels: it emulates every element)."""
    B, T, K = (1, 4096, 8) if DEVICE == "cpu" else (4, 4096, 128)
    args = make(B, T, K, torch.float32, DEVICE, seed=5)
    ref = naive_eigen_scan(*[a.cpu() for a in args])
    out = triton_eigen_scan(*args, out=poisoned(args[0]))
    assert rel_l2(out, ref) < TOL[torch.float32]


def test_vectorised_long_sequence_all_dtypes():
    for dtype in DTYPES:
        args = make(2, 4096, 16, dtype, seed=6)
        assert rel_l2(vectorised_eigen_scan(*args), naive_eigen_scan(*args)) < TOL[dtype]


@pytest.mark.parametrize("form", ["vectorised", "triton", "reference"])
def test_split_sequence_equals_full(form):
    fn = {"vectorised": vectorised_eigen_scan, "reference": reference_eigen_scan,
          "triton": lambda *a: triton_eigen_scan(*a, out=poisoned(a[0]))}[form]
    device = DEVICE if form == "triton" else "cpu"
    x_re, x_im, nu, theta, h_re, h_im = make(2, 97, 12, torch.float32, device, seed=3)
    full = fn(x_re, x_im, nu, theta, h_re, h_im)
    cut = 40
    a = fn(x_re[:, :cut], x_im[:, :cut], nu, theta, h_re, h_im)
    b = fn(x_re[:, cut:], x_im[:, cut:], nu, theta, a[0][:, -1], a[1][:, -1])
    joined = (torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
    # equal up to fp32 rounding (chunk boundaries move with the cut)
    full_c = torch.complex(full[0].double().cpu(), full[1].double().cpu())
    assert rel_l2(joined, full_c) < 5e-6


def test_decays_are_stable_for_large_nu():
    """|lam| near 0 (nu large) and near 1 (nu very negative) stay finite: no lam^-t."""
    B, T, K = 1, 200, 4
    x_re, x_im, _, theta, h_re, h_im = make(B, T, K, torch.float32, DEVICE)
    nu = torch.tensor([3.0, 0.0, -5.0, -12.0], device=DEVICE)
    ref = naive_eigen_scan(*[a.cpu() for a in (x_re, x_im, nu, theta, h_re, h_im)])
    for fn in (vectorised_eigen_scan, reference_eigen_scan):
        cpu = [a.cpu() for a in (x_re, x_im, nu, theta, h_re, h_im)]
        assert rel_l2(fn(*cpu), ref) < 2e-5
    assert rel_l2(triton_eigen_scan(x_re, x_im, nu, theta, h_re, h_im,
                                    out=poisoned(x_re)), ref) < 2e-5


def test_fake_tensor_and_export_see_one_opaque_op():
    args = make(2, 9, 4, torch.float32)

    class Wrap(torch.nn.Module):
        def forward(self, *a):
            return eigen_scan(*a)

    program = torch.export.export(Wrap(), args)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["seqdeploy.eigen_scan.default", "<built-in function getitem>",
                       "<built-in function getitem>"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        y_re, y_im = eigen_scan(*fake)
        assert y_re.shape == (2, 9, 4) and y_im.dtype == torch.float32


def test_torch_compile_keeps_the_op_whole():
    args = make(2, 33, 4, torch.float32)
    out, seen = compile_and_trace(lambda *a: eigen_scan(*a), *args)
    assert "seqdeploy.eigen_scan.default" in seen
    assert rel_l2(out, naive_eigen_scan(*args)) < 2e-5


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dispatch_runs_triton_at_4096(dtype):
    """The registered op on CUDA is the Triton kernel; many chunks exercise the look-back."""
    args = make(3, 4096, 128, dtype, "cuda", seed=9, strided=True)
    ref = naive_eigen_scan(*[a.cpu() for a in args])
    out = eigen_scan(*args)
    assert out[0].is_cuda
    assert rel_l2(out, ref) < TOL[dtype]
    # repeated launches agree to rounding: the look-back may sum a chunk's predecessors in a
    # different order from run to run, never a different value
    again = eigen_scan(*args)
    assert rel_l2(again, torch.complex(out[0].double().cpu(), out[1].double().cpu())) < TOL[dtype] / 10
