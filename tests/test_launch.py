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
import triton
import triton.language as tl
from conftest import gpu
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from seqdeploy import launch
from seqdeploy.launch import Launcher
from seqdeploy.ops import call
from seqdeploy_cfc import kernels
from seqdeploy_cfc.kernels import choose, triton_cfc_scan
from seqdeploy_cfc.ops import cfc_scan_op, cpu_cfc_scan, cuda_cfc_scan, naive_cfc_scan


def inputs(B=3, T=7, H=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    xw = torch.randn(B, T, H, generator=g)
    h0 = 0.5 * torch.randn(B, H, generator=g)
    w = torch.randn(H, H, generator=g) / math.sqrt(H)
    tau = torch.rand(H, generator=g) + 0.05
    return [t.to(device) for t in (xw.to(dtype), h0.to(dtype), w.to(dtype), tau)]


class Counting:
    """Counts calls, then runs the real implementation it wraps."""

    def __init__(self, impl=cpu_cfc_scan):
        self.calls = 0
        self.impl = impl

    def __call__(self, xw, h0, w_rec, tau, dt):
        self.calls += 1
        return self.impl(xw, h0, w_rec, tau, dt)


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


def test_functorch_transforms_go_through_the_op(op_and_probe):
    """Under vmap and functionalize the tensors look plain; the op must still be used."""
    op, probe = op_and_probe
    args = inputs()
    batched = torch.stack([args[0], args[0] * 0.5])
    ys = torch.vmap(lambda xw: call(op, xw, *args[1:], 0.5))(batched)
    check(ys[0], args)
    check(ys[1], [batched[1], *args[1:]])
    check(torch.func.functionalize(lambda *a: call(op, *a, 0.5))(*args), args)
    assert probe.calls == 0


def test_subclass_or_keyword_arguments_go_through_the_op(op_and_probe):
    """A tensor subclass anywhere (not just first) and a keyword tensor needing grad take
    the op; a call with only keywords works on either path."""
    from torch.testing._internal.two_tensor import TwoTensor

    op, probe = op_and_probe
    args = inputs()
    w = TwoTensor(args[2], args[2].clone())
    y = call(op, args[0], args[1], w, args[3], 0.5)
    assert isinstance(y, TwoTensor) and probe.calls == 0
    check(y.a, args)
    tau = args[3].clone().requires_grad_(True)
    y = call(op, args[0], args[1], args[2], tau=tau, dt=0.5)
    assert y.requires_grad and probe.calls == 0
    check(call(op, xw=args[0], h0=args[1], w_rec=args[2], tau=args[3], dt=0.5), args)
    assert probe.calls == 1


def test_out_is_checked():
    """``out`` of the wrong shape, dtype or layout, or sharing memory with an input, is
    refused before anything runs."""
    args = inputs(B=2, T=3, H=16)
    for bad in (torch.empty(2, 3, 15), torch.empty(2, 3, 16, dtype=torch.float64),
                torch.empty(2, 16, 3).transpose(1, 2), args[0]):
        with pytest.raises(ValueError, match="out"):
            triton_cfc_scan(*args, 0.5, out=bad)


# -- GPU: the fast paths against the ones they replace -----------------------------------------
def plan_of(args):
    B, T, H = args[0].shape
    return choose(B, T, H, args[0].dtype, kernels.gpu_of(args[0].device))


def plain(args, dt, monkeypatch):
    """The result through Triton's own ``kernel[grid]`` path (off the version check), for the
    plan the default call makes (a design launched without clusters)."""
    plan = plan_of(args)
    assert not plan.cluster, plan
    with monkeypatch.context() as m:
        m.setattr(launch, "PRIVATE_LAUNCH", False)
        return triton_cfc_scan(*args, dt, plan=plan)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_direct_call_and_cached_launch_match_the_plain_path(dtype, monkeypatch):
    """On CUDA, ``call`` takes the direct path and, from the second call on, the cached
    binary; both give the plain path's bits (odd shapes, a strided view)."""
    args = inputs(B=5, T=9, H=40, dtype=dtype, device="cuda")
    args[0] = args[0][:, 1:]                                    # a strided view
    expected = plain(args, 0.5, monkeypatch)
    probe = Counting(cuda_cfc_scan)
    op = dataclasses.replace(cfc_scan_op(), eager={"cuda": probe})
    rows = kernels.launcher("rows")
    before = rows.fast_calls
    for _ in range(3):
        torch.testing.assert_close(call(op, *args, 0.5), expected, rtol=0, atol=0)
    assert probe.calls == 3
    assert rows.fast_calls >= before + (2 if launch.PRIVATE_LAUNCH else 0)
    ref = naive_cfc_scan(*[a.cpu() for a in args], 0.5)
    assert float((expected.double().cpu() - ref).norm() / ref.norm()) < 1e-3


@gpu
def test_cached_binaries_follow_every_specialization(monkeypatch):
    """Calls that differ from a cached one only in what Triton specializes on (a pointer's
    16-byte alignment; an integer equal to 1) get their own binary and stay correct, in
    either order, with new data each time."""
    H = 32
    wide = inputs(B=4, T=6, H=H + 8, device="cuda")[0]
    rest = inputs(B=4, T=6, H=H, device="cuda")[1:]
    cases = [(slice(None), slice(0, H)), (slice(None), slice(1, H + 1)),   # 4 bytes off
             (slice(0, 1), slice(0, H)), (slice(0, 2), slice(0, H)),
             (slice(0, 1), slice(1, H + 1))]
    rows = kernels.launcher("rows")
    before = rows.fast_calls
    for _ in range(2):
        for i, (ts, hs) in enumerate(cases):
            xw = (wide * (1 + 0.1 * i))[:, ts, hs]                 # new data, the same view
            args = [xw, *rest]
            y = triton_cfc_scan(*args, 0.5)
            torch.testing.assert_close(y, plain(args, 0.5, monkeypatch), rtol=0, atol=0)
            ref = naive_cfc_scan(*[a.cpu() for a in args], 0.5)
            assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-5
    if launch.PRIVATE_LAUNCH:
        assert rows.fast_calls >= before + len(cases)


@gpu
@pytest.mark.parametrize("B,T,H", [(5, 9, 40), (32, 10, 256), (1, 1, 256)])
def test_ready_launch_matches_and_steps_aside(B, T, H):
    """A repeat default call launches what the first one kept ready: the rows kernel, a
    cluster design and a single split step (one launch through the C launcher each). It
    gives the full launch's bits (the plan passed explicitly) on new data each time; an
    input that is not 16-byte aligned (never kept ready) and a launch hook (which a plain
    launch must call) send the call down the full path, still right."""
    args = inputs(B=B, T=T, H=H, dtype=torch.float16, device="cuda")
    wide = torch.randn(B, T, H + 8, device="cuda").half()
    plan = plan_of(args)
    run = kernels.launcher(plan.design)
    for i in range(3):
        args[0] = wide[..., :H] * (1 + 0.1 * i)     # new data, same layout
        before = run.fast_calls
        y = triton_cfc_scan(*args, 0.5)
        if i and launch.PRIVATE_LAUNCH:
            assert run.fast_calls == before + 1
        torch.testing.assert_close(y, triton_cfc_scan(*args, 0.5, plan=plan), rtol=0, atol=0)
    flat = torch.empty(B * T * H + 1, device="cuda", dtype=torch.float16)
    misaligned = flat[1:].view(B, T, H).copy_(args[0])   # 2 bytes off, the same signature
    seen = []
    for variant in ("misaligned", "hooked"):
        xw = misaligned if variant == "misaligned" else args[0]
        hooks = triton.knobs.runtime.launch_enter_hook
        with pytest.MonkeyPatch.context() as m:
            if variant == "hooked":
                m.setattr(hooks, "calls", [*hooks.calls, lambda *a: seen.append(1)])
            y = triton_cfc_scan(xw, *args[1:], 0.5)
        expected = triton_cfc_scan(xw, *args[1:], 0.5, plan=plan)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        ref = naive_cfc_scan(*[a.cpu() for a in (xw, *args[1:])], 0.5)
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-3, variant
    # a hooked plain launch goes through kernel[grid], which calls the hook; cluster
    # launches call none
    assert bool(seen) == (not plan.cluster)


@gpu
def test_direct_call_captures_into_a_cuda_graph():
    """The direct path launches on the current stream, so it records into a CUDA graph on a
    side stream like any op, and replays with new data."""
    op = cfc_scan_op()
    args = inputs(B=3, T=5, H=48, dtype=torch.float16, device="cuda")
    call(op, *args, 0.5)                                        # compile outside capture
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        y = call(op, *args, 0.5)
    args[0].mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = naive_cfc_scan(*[a.cpu() for a in args], 0.5)
    assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-3


@gpu
def test_off_the_version_check_every_call_is_the_public_launch(monkeypatch):
    """Where the Triton version is not one whose private launcher the tests ran, every call
    is ``kernel[grid]``: right, nothing cached for direct launches, no cluster launches."""
    monkeypatch.setattr(launch, "PRIVATE_LAUNCH", False)
    args = inputs(B=3, T=7, H=24, device="cuda")
    probe = Launcher(kernels.launcher("rows").kernel, tensors=5)
    B, T, H = args[0].shape
    plan = choose(B, T, H, torch.float32, kernels.gpu_of("cuda"))
    y = torch.empty_like(args[0])
    grid, values = (plan.grid(B, H),), plan.constexprs(H)
    full = (*args, y, 0.5, B, T, H, T * H, H, H, H, T * H, H)
    for _ in range(2):
        probe(grid, full, values, num_warps=plan.num_warps)
    assert probe.fast_calls == 0 and probe.bind(grid, full, values) is None
    assert not launch.cluster_launch_available()
    check(y.cpu(), [a.cpu() for a in args])


@gpu
def test_nan_input_propagates():
    """A NaN in one row's input makes that row NaN from there on and leaves the others
    right, in every design this GPU runs at H=64 (rows; split as clusters)."""
    args = inputs(B=20, T=12, H=64, dtype=torch.float16, device="cuda")
    args[0][3, 5, 7] = math.nan
    plans = [plan_of(args)]
    gpu_ = kernels.gpu_of("cuda")
    if gpu_.clusters:
        plans.append(choose(20, 12, 256, torch.float16, dataclasses.replace(gpu_, wgmma=False)))
        plans[-1] = dataclasses.replace(plans[-1], block_h=64, block_n=16)
    for plan in plans:
        y = triton_cfc_scan(*args, 0.5, plan=plan)
        torch.cuda.synchronize()
        assert torch.isnan(y[3, 5, 7]) and torch.isnan(y[3, 6:]).all()
        assert not torch.isnan(y[3, :5]).any()
        keep = [i for i in range(20) if i != 3]
        ref = naive_cfc_scan(*[a.cpu() for a in args], 0.5)[keep]
        assert float((y[keep].double().cpu() - ref).norm() / ref.norm()) < 1e-3, plan


@triton.jit
def _cluster_ids(out_ptr):
    """Each program stores its position: program id, rank in its cluster, cluster size."""
    pid = tl.program_id(0)
    rank = tl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [pid],
                                     dtype=tl.int32, is_pure=True, pack=1)
    size = tl.inline_asm_elementwise("mov.u32 $0, %cluster_nctarank;", "=r,r", [pid],
                                     dtype=tl.int32, is_pure=True, pack=1)
    tl.store(out_ptr + pid * 3, pid)
    tl.store(out_ptr + pid * 3 + 1, rank)
    tl.store(out_ptr + pid * 3 + 2, size)


def test_clustered_launch_refused_where_unavailable(monkeypatch):
    """Off the version check there is no launcher that can ask for clusters: a cluster launch
    is a clear error (and the cfc dispatch then chooses no cluster design)."""
    monkeypatch.setattr(launch, "PRIVATE_LAUNCH", False)
    with pytest.raises(RuntimeError, match="cluster launches"):
        Launcher(_cluster_ids, tensors=1).clustered((8,), 4, (torch.zeros(1),), ())


@gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
def test_clustered_launch_groups_consecutive_programs(cluster):
    """``Launcher.clustered`` runs the grid as clusters of ``cluster`` consecutive programs:
    program p is rank p % cluster of a cluster of that size, on the first launch (which
    compiles) and on later ones, and inside a CUDA graph."""
    if not kernels.gpu_of("cuda").clusters:
        pytest.skip("this GPU or Triton has no cluster launches")
    launcher = Launcher(_cluster_ids, tensors=1)
    programs = 4 * 8
    expected = torch.tensor([[p, p % cluster, cluster] for p in range(programs)],
                            dtype=torch.int32)
    for _ in range(2):
        out = torch.full((programs, 3), -1, dtype=torch.int32, device="cuda")
        launcher.clustered((programs,), cluster, (out,), ())
        assert torch.equal(out.cpu(), expected)
    out.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launcher.clustered((programs,), cluster, (out,), ())
    out.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), expected)
    with pytest.raises(ValueError, match="clusters of"):
        launcher.clustered((programs + 1,), cluster if cluster > 1 else 2, (out,), ())
