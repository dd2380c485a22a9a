"""The ``ort`` engine's native op library (seqdeploy/ort_native): it builds here, its CPU
kernel of every op matches the float64 naive loop and plain ORT on the fallback function
(``ort-onnx``) in fp32 and fp16 at the validation shapes, the registered kernel (not the
function's Scan) is what runs, and the engines and the build command say why in one line
when they cannot work. GPU tests (marker ``gpu``) run the CUDA kernels (the plugins' Triton
kernels compiled ahead of time) on ORT's CUDA provider against the torch op.

One harness for every op (``OP_CASES``): a new op with an ORT kernel adds one entry.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from onnx import TensorProto, helper

from seqdeploy.errors import EngineUnavailable
from seqdeploy.ops import DOMAIN, plugin_attributes
from seqdeploy.ort_native.build import BuildError, build_library, ort_ops
from seqdeploy.plugins import load_registry

ort = pytest.importorskip("onnxruntime")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NP = {"fp32": np.float32, "fp16": np.float16}
ONNX_T = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
#: (batch, seq): the validation shapes T = 1, an odd T and a long T
SHAPES = [(1, 1), (2, 63), (1, 2048)]
#: rel-L2 limits against the float64 loop and against ort-onnx (DESIGN.md defaults)
LIMITS = {"fp32": 1e-5, "fp16": 5e-3}
#: one op against another implementation at up to T = 4096: two fp32 recurrences differ by a
#: few ulps per step (test_eigen_scan's fp32 tolerance, 2e-5)
OP_LIMITS = {"fp32": 2e-5, "fp16": 5e-3}


# -- the ops: inputs, float64 reference, attributes ----------------------------------------
def _eigen_inputs(B, T, dtype, rng):
    K = 40   # not a multiple of the CUDA tile (32): partial tiles are masked
    x = lambda *s: (rng.standard_normal(s)).astype(NP[dtype])  # noqa: E731
    return {"x_re": x(B, T, K), "x_im": x(B, T, K),
            "nu": np.log(-np.log(rng.uniform(0.9, 0.999, K))).astype(np.float32),
            "theta": rng.uniform(0, np.pi, K).astype(np.float32),
            "h0_re": x(B, K) * 0.5, "h0_im": x(B, K) * 0.5}


def _eigen_naive(inputs, attrs):
    from seqdeploy_ten.ops import naive_eigen_scan

    y = naive_eigen_scan(*(torch.from_numpy(inputs[k].astype(np.float64)) for k in
                           ("x_re", "x_im", "nu", "theta", "h0_re", "h0_im")))
    return [y.real.numpy(), y.imag.numpy()]


def _cfc_inputs(B, T, dtype, rng):
    H = 48   # not a power of two: the CUDA tile (64) masks its padding
    return {"xw": rng.standard_normal((B, T, H)).astype(NP[dtype]),
            "h0": (0.5 * rng.standard_normal((B, H))).astype(NP[dtype]),
            "w_rec": (rng.standard_normal((H, H)) * 0.5 / np.sqrt(H)).astype(NP[dtype]),
            "tau": (np.exp(rng.uniform(np.log(0.5), np.log(20.0), H)) + 0.01).astype(np.float32)}


def _cfc_naive(inputs, attrs):
    from seqdeploy_cfc.ops import naive_cfc_scan

    y = naive_cfc_scan(*(torch.from_numpy(inputs[k].astype(np.float64)) for k in
                         ("xw", "h0", "w_rec", "tau")), attrs["dt"])
    return [y.numpy()]


def _lam_inputs(B, T, dtype, rng):
    """As the encoder makes them: unit keys, queries scaled by 1/sqrt(d), beta and mix in (0, 1),
    log-decays around log 0.5 (fast) and log 0.97 (slow), fp32 like the state (fp32 islands)."""
    n, d, dv = 2, 20, 40   # masked lanes in d and dv; dv spans two CUDA value blocks (32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    return {"q": (unit(rng.standard_normal((B, T, n, d))) / np.sqrt(d)).astype(NP[dtype]),
            "k": unit(rng.standard_normal((B, T, n, d))).astype(NP[dtype]),
            "v": rng.standard_normal((B, T, n, dv)).astype(NP[dtype]),
            "beta": rng.uniform(0, 1, (B, T, n)).astype(NP[dtype]),
            "g_fast": log_sigmoid(rng.standard_normal((B, T, n))).astype(np.float32),
            "g_slow": log_sigmoid(np.log(0.97 / 0.03) + rng.standard_normal((B, T, n))).astype(np.float32),
            "mix": rng.uniform(0, 1, (B, T, n)).astype(NP[dtype]),
            "state0": (0.5 * rng.standard_normal((B, n, 2, d, dv))).astype(np.float32)}


def _lam_naive(inputs, attrs):
    from seqdeploy_lam.ops import INPUTS, naive_dual_delta_rule

    o, state = naive_dual_delta_rule(*(torch.from_numpy(inputs[k].astype(np.float64)) for k in INPUTS))
    return [o.numpy(), state.numpy()]


OP_CASES = {
    "eigen_scan": (_eigen_inputs, _eigen_naive, {}),
    "cfc_scan": (_cfc_inputs, _cfc_naive, {"dt": 0.7}),
    "dual_delta_rule": (_lam_inputs, _lam_naive, {}),
}


def test_every_op_with_an_ort_kernel_has_a_case():
    registry = load_registry()
    with_kernel = {op.name for op in registry.ops.values() if op.onnx_name in ort_ops(registry)}
    # the built-in ops have kernels; an op without one makes `ort` refuse models using it
    assert with_kernel == set(OP_CASES) and {"eigen_scan", "cfc_scan", "dual_delta_rule"} <= with_kernel


def output_likes(op, inputs: dict, attrs: dict) -> list[np.ndarray]:
    """An empty array per output of the op, shaped and typed as its fake implementation makes
    them from ``inputs`` (on meta tensors)."""
    outs = op.torch_op(*(torch.from_numpy(v).to("meta") for v in inputs.values()), *attrs.values())
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    return [np.empty(o.shape, torch.empty(0, dtype=o.dtype).numpy().dtype) for o in outs]


def single_node_model(op, inputs: dict, attrs: dict, dtype: str) -> bytes:
    """One seqdeploy node with the op's fallback function attached, as export makes it."""
    def value(name, arr):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                             list(arr.shape))
    outputs = [p.name for p in op.schema.outputs]
    node = helper.make_node(op.onnx_name, list(inputs), outputs, domain=DOMAIN,
                            **plugin_attributes(), **attrs)
    likes = output_likes(op, inputs, attrs)
    graph = helper.make_graph([node], op.name, [value(k, v) for k, v in inputs.items()],
                              [value(o, like) for o, like in zip(outputs, likes)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(op.fallback(20))
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def library():
    return build_library(load_registry())


def run_poisoned(session, inputs, likes: list[np.ndarray]) -> list[np.ndarray]:
    """Run with every output bound to a NaN-filled host buffer shaped like ``likes``: an
    element a kernel never writes stays NaN."""
    binding = session.io_binding()
    for k, v in inputs.items():
        binding.bind_cpu_input(k, v)
    outs = []
    for o, like in zip(session.get_outputs(), likes):
        buf = np.full(like.shape, np.nan, dtype=like.dtype)
        binding.bind_output(o.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        outs.append(buf)
    session.run_with_iobinding(binding)
    return outs


def rel_l2(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten or overflowed)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def session(model: bytes, library=None, providers=("CPUExecutionProvider",), profile=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(str(library))
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(model, options, providers=list(providers))


# -- the build -----------------------------------------------------------------------------
def test_build_command_prints_the_cached_library_last(library, capsys):
    code, out, err = run_cli(["build-ort-ops"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(library) and library.is_file()
    assert library.parent.parent.name == "ort-ops"


def test_library_needs_no_onnxruntime_or_cuda_at_link_time(library):
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    libs = re.findall(r"Shared library: \[([^\]]+)\]", needed)
    assert libs and not [n for n in libs if "onnxruntime" in n or "cuda" in n], libs
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True,
                             text=True).stdout
    assert re.search(r"\bT RegisterCustomOps\b", symbols)


@pytest.mark.parametrize("env,message", [
    ({"CXX": "no-such-compiler-xyz"}, "no C++ compiler (no-such-compiler-xyz not found): install"),
    ({"SEQDEPLOY_ORT_INCLUDE": "/nonexistent"}, "SEQDEPLOY_ORT_INCLUDE=/nonexistent holds no"),
])
def test_missing_compiler_or_headers_is_one_line(env, message, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BuildError) as info:
        build_library(load_registry())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    code, out, err = run_cli(["build-ort-ops"], capsys)
    assert code != 0 and err.count("\n") == 1 and message in err
    # the engine says the same, and never falls back to the functions
    from seqdeploy.engines.ort import OrtEngine, OrtOnnxEngine

    with pytest.raises(EngineUnavailable, match="ORT op library cannot be built"):
        OrtEngine().check("cpu")
    OrtOnnxEngine().check("cpu")   # plain ORT needs no library


def test_ptx_keeps_every_argument_and_assembles(tmp_path):
    """The AOT ABI: the PTX entry takes the kernel's runtime arguments in order (nothing
    specialised away, an i32 that could be 1 included) plus Triton's two scratch pointers,
    which the library passes as null; and the pinned PTX ISA version assembles."""
    from seqdeploy.ort_native.aot import entry_params

    registry = load_registry()
    aot = ort_ops(registry)["CfCScan"].triton[0]
    constexprs, warps = aot.variants("fp16")["h16"]
    signature = {k: v.replace("*T", "*fp16") for k, v in aot.signature.items()}
    jobs = [{"name": "cfc_h16", "kernel": aot.kernel, "signature": signature,
             "constexprs": constexprs, "num_warps": warps, "arch": arch} for arch in (80, 90)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "seqdeploy.ort_native.aot", str(tmp_path / "jobs.json"),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads((tmp_path / "kernels.json").read_text())
    for fact in facts:
        ptx = Path(fact["ptx"]).read_text()
        assert ".version 8.0" in ptx
        assert entry_params(ptx) == ("_cfc_scan_kernel", len(signature) + 2)
        assert (fact["n_args"], fact["n_params"]) == (len(signature), len(signature) + 2)
        assert fact["num_warps"] == warps
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception:
        pytest.skip("this triton ships no ptxas")
    for fact in facts:
        arch = "sm_90a" if fact["arch"] == 90 else "sm_80"
        out = subprocess.run([ptxas, f"--gpu-name={arch}", fact["ptx"], "-o", str(tmp_path / "k.cubin")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-1000:]


# -- CPU kernels against the float64 loop and against ort-onnx -----------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_cpu_kernel_matches_naive_and_the_function(library, name, dtype, shape):
    registry = load_registry()
    op = registry.ops[name]
    make, naive, attrs = OP_CASES[name]
    inputs = make(*shape, dtype, np.random.default_rng(hash((name, dtype, shape)) % 2**32))
    model = single_node_model(op, inputs, attrs, dtype)
    likes = output_likes(op, inputs, attrs)
    ours = run_poisoned(session(model, library), inputs, likes)
    function = run_poisoned(session(model), inputs, likes)
    reference = naive(inputs, attrs)
    assert len(reference) == len(ours) == len(op.schema.outputs)
    for r, a, f, param in zip(reference, ours, function, op.schema.outputs):
        # fp32 islands (a state) stay fp32 in fp16 graphs; the op's fake agrees with its schema
        assert a.dtype == (np.float32 if param.type_str == "tensor(float)" else NP[dtype])
        assert rel_l2(r, a) < OP_LIMITS[dtype], ("vs naive", rel_l2(r, a))
        assert rel_l2(f, a) < OP_LIMITS[dtype], ("vs ort-onnx", rel_l2(f, a))
        # fp32 state inside: the library is no worse than the function against float64
        assert rel_l2(r, a) <= 2 * rel_l2(r, f) + 1e-6


def _profiled_ops(tmp_path, model, inputs, library) -> set[tuple[str, str]]:
    s = session(model, library, profile=tmp_path / ("lib" if library else "fn"))
    s.run(None, inputs)
    events = json.loads(Path(s.end_profiling()).read_text())
    return {(e["args"].get("op_name"), e["args"].get("provider")) for e in events
            if e.get("cat") == "Node" and "args" in e}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_the_library_runs_not_the_function(library, name, tmp_path):
    """ORT's profile lists the kernels that ran: with the library, the seqdeploy node itself
    on the CPU provider and no Scan; without it, the function's Scan (so the check can fail)."""
    op = load_registry().ops[name]
    make, _, attrs = OP_CASES[name]
    inputs = make(2, 9, "fp32", np.random.default_rng(0))
    model = single_node_model(op, inputs, attrs, "fp32")
    with_library = _profiled_ops(tmp_path, model, inputs, library)
    assert with_library == {(op.onnx_name, "CPUExecutionProvider")}
    without = {o for o, _ in _profiled_ops(tmp_path, model, inputs, None)}
    assert "Scan" in without and op.onnx_name not in without


def test_ort_engine_on_an_exported_model(ten_artifact, tmp_path):
    """The engines on a real export (ten/tiny, 2 EigenScan nodes): ``ort`` runs the library's
    kernel for every node (no Scan in ORT's profile) and agrees with ``ort-onnx`` and torch."""
    from seqdeploy import pipeline
    from seqdeploy.artifacts import Artifact
    from seqdeploy.engines.ort import engine_session
    from seqdeploy.parity import compare
    from seqdeploy.precision import ONNX_FILES, cast_inputs

    registry = load_registry()
    artifact = Artifact.load(ten_artifact / "ten" / "tiny")
    arch = registry.architecture("ten")
    for precision in ("fp32", "fp16"):
        sessions = {e: pipeline.open_session(registry, artifact, e, precision, "cpu")
                    for e in ("torch", "ort", "ort-onnx")}
        inputs = cast_inputs(arch.make_inputs(artifact.manifest["config"], 2, 63, seed=5),
                             sessions["torch"].input_specs, precision)
        outs = {e: s.run(inputs) for e, s in sessions.items()}
        for name, ref in outs["torch"].items():
            for e in ("ort", "ort-onnx"):
                assert compare(ref, outs[e][name]).rel_l2 < LIMITS[precision], (e, name)
        s, _ = engine_session("ort", registry, artifact.path(ONNX_FILES[precision]), "cpu",
                              profile_prefix=str(tmp_path / precision))
        s.run(None, {k: v.numpy() for k, v in inputs.items()})
        events = json.loads(Path(s.end_profiling()).read_text())
        ran = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "args" in e]
        assert ran.count("EigenScan") == 2 and "Scan" not in ran


def test_ort_refuses_a_model_with_an_op_it_has_no_kernel_for(library, tmp_path):
    from seqdeploy.engines.ort import check_native_ops

    node = helper.make_node("NoSuchScan", ["x"], ["y"], domain=DOMAIN)
    f32 = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])  # noqa: E731
    model = helper.make_model(helper.make_graph([node], "g", [f32("x")], [f32("y")]))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(EngineUnavailable, match="has no kernel for NoSuchScan"):
        check_native_ops(tmp_path / "m.onnx", load_registry())


def test_onnxruntime_version_is_supported(library):
    major, minor = (int(v) for v in ort.__version__.split(".")[:2])
    assert (major, minor) >= (1, 30)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))   # raises if it cannot load


# -- GPU: the CUDA kernels on ORT's CUDA provider --------------------------------------------
def _cuda_provider():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ("CUDAExecutionProvider", "CPUExecutionProvider")


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES + [(16, 2048), (3, 4096)], ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_cuda_kernel_matches_torch_and_naive(library, name, dtype, shape, tmp_path):
    registry = load_registry()
    op = registry.ops[name]
    make, naive, attrs = OP_CASES[name]
    inputs = make(*shape, dtype, np.random.default_rng(7))
    model = single_node_model(op, inputs, attrs, dtype)
    s = session(model, library, _cuda_provider(), profile=tmp_path / "p")
    binding = s.io_binding()
    cuda_in = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
    for k, t in cuda_in.items():
        binding.bind_input(k, "cuda", 0, NP[dtype] if t.dtype != torch.float32 else np.float32,
                           list(t.shape), t.data_ptr())
    outs = []
    for o, like in zip(s.get_outputs(), output_likes(op, inputs, attrs)):
        buf = torch.full(like.shape, float("nan"), dtype=torch.from_numpy(like).dtype, device="cuda")
        binding.bind_output(o.name, "cuda", 0, like.dtype, list(buf.shape), buf.data_ptr())
        outs.append(buf)
    s.run_with_iobinding(binding)
    torch.cuda.synchronize()
    args = [cuda_in[k] for k in inputs] + list(attrs.values())
    expected = op.torch_op(*args)
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    for r, t, a in zip(naive(inputs, attrs), expected, outs):
        a = a.cpu().numpy()
        assert rel_l2(t.cpu().numpy(), a) < OP_LIMITS[dtype], ("vs torch", rel_l2(t.cpu().numpy(), a))
        assert rel_l2(r, a) < LIMITS[dtype], ("vs naive", rel_l2(r, a))
    events = json.loads(Path(s.end_profiling()).read_text())
    ran = {(e["args"].get("op_name"), e["args"].get("provider")) for e in events
           if e.get("cat") == "Node" and "args" in e}
    assert ran == {(op.onnx_name, "CUDAExecutionProvider")}


@gpu
@needs_cuda
def test_cuda_cfc_refuses_what_it_has_no_tile_for(library):
    op = load_registry().ops["cfc_scan"]
    rng = np.random.default_rng(0)
    H = 300
    inputs = {"xw": rng.standard_normal((2, 3, H)).astype(np.float32),
              "h0": np.zeros((2, H), np.float32), "w_rec": np.zeros((H, H), np.float32),
              "tau": np.ones(H, np.float32)}
    s = session(single_node_model(op, inputs, {"dt": 1.0}, "fp32"), library, _cuda_provider())
    with pytest.raises(Exception, match="supports H <= 256 in fp32, got 300"):
        s.run(None, inputs)
