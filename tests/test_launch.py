"""The host-overhead paths: ``ops.call``'s direct eager call and ``launch.Launcher``.

Both skip machinery (the dispatcher, Triton's argument binding) only where nothing can tell
the difference. The routing tests give the real cfc op an ``eager`` entry for the CPU whose
function counts its calls and then runs the op's own CPU implementation, so the answer is
checked against the float64 loop either way. The GPU tests compare the fast paths bit for
bit with the slow ones they replace.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import gpu
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from seqdeploy.launch import Launcher
from seqdeploy.ops import call
from seqdeploy_cfc.kernels import triton_cfc_scan
from seqdeploy_cfc.ops import cfc_scan, cfc_scan_op, cpu_cfc_scan, naive_cfc_scan


def inputs(B=3, T=7, H=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    xw = torch.randn(B, T, H, generator=g)
    h0 = 0.5 * torch.randn(B, H, generator=g)
    w = torch.randn(H, H, generator=g) / math.sqrt(H)
    tau = torch.rand(H, generator=g) + 0.05
    return [t.to(device) for t in (xw.to(dtype), h0.to(dtype), w.to(dtype), tau)]


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, xw, h0, w_rec, tau, dt):
        self.calls += 1
        return cpu_cfc_scan(xw, h0, w_rec, tau, dt)


@pytest.fixture
def op_and_probe():
    probe = Counting()
    return dataclasses.replace(cfc_scan_op(), eager={"cpu": probe}), probe


def check(y, args):
    ref = naive_cfc_scan(*[a.detach() for a in args], 0.5)
    assert float((y.detach().double() - ref).norm() / ref.norm()) < 1e-5


def test_eager_inference_calls_the_kernel_directly(op_and_probe):
    op, probe = op_and_probe
    args = inputs()
    y = call(op, *args, 0.5)
    assert probe.calls == 1
    check(y, args)


def test_inputs_needing_grad_go_through_the_op(op_and_probe):
    op, probe = op_and_probe
    args = inputs()
    args[2].requires_grad_(True)
    y = call(op, *args, 0.5)
    assert probe.calls == 0
    check(y, args)
    with torch.no_grad():            # no graph is recorded: the direct call is fine again
        call(op, *args, 0.5)
    assert probe.calls == 1


def test_traced_faked_or_observed_calls_go_through_the_op(op_and_probe):
    op, probe = op_and_probe
    args = inputs()

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        check(call(op, *args, 0.5), args)
    assert any("cfc_scan" in name for name in seen.ops)

    traced = torch.jit.trace(lambda *a: call(op, *a, 0.5), args, check_trace=False)
    assert "cfc_scan" in str(traced.graph)
    check(traced(*args), args)       # (check_trace would rerun the function untraced)

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        assert call(op, *fake, 0.5).shape == args[0].shape

    exported = torch.export.export(Model(op), tuple(args))
    assert any("cfc_scan" in str(n.target) for n in exported.graph.nodes)
    assert probe.calls == 0


class Model(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, xw, h0, w_rec, tau):
        return call(self.op, xw, h0, w_rec, tau, 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without CUDA")
def test_launcher_on_cpu_tensors_takes_the_plain_path():
    """The interpreter (CPU tensors) never uses the cached-binary path."""
    args = inputs(B=2, T=3, H=16)
    y = triton_cfc_scan(*args, 0.5, out=torch.full_like(args[0], math.nan))
    check(y, args)
    from seqdeploy_cfc import kernels

    assert kernels._rows_launcher.fast_calls == 0


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_direct_call_and_cached_launch_match_the_dispatcher(dtype):
    """On CUDA: the op through the dispatcher (Triton's own launch path the first time), then
    the direct call and the cached binary, give identical bits; odd shapes and strides."""
    from seqdeploy_cfc import kernels

    args = inputs(B=5, T=9, H=40, dtype=dtype, device="cuda")
    args[0] = args[0][:, 1:]                                    # a strided view
    first = torch.ops.seqdeploy.cfc_scan(*args, 0.5)
    before = kernels._rows_launcher.fast_calls
    op = cfc_scan_op()
    for _ in range(3):
        again = call(op, *args, 0.5)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert kernels._rows_launcher.fast_calls > before
    # a new specialization (H divisible by 16) is compiled, not served from the H=40 binary
    args16 = inputs(B=5, T=9, H=32, dtype=dtype, device="cuda")
    out = call(op, *args16, 0.5)
    ref = naive_cfc_scan(*[a.cpu() for a in args16], 0.5)
    assert float((out.double().cpu() - ref).norm() / ref.norm()) < 1e-3
    assert cfc_scan is op.torch_op


@gpu
def test_launcher_relaunches_the_cached_binary_with_new_data():
    """A cached binary launched with other tensors of the same signature reads those
    tensors, not the first call's."""
    a = inputs(B=4, T=6, H=32, device="cuda")
    b = [t * 0.5 if i < 3 else t for i, t in enumerate(inputs(B=4, T=6, H=32, device="cuda"))]
    for args in (a, b, a, b):
        y = triton_cfc_scan(*args, 0.5)
        ref = naive_cfc_scan(*[t.cpu() for t in args], 0.5)
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-5
    assert isinstance(Launcher.enabled, bool) and Launcher.enabled
