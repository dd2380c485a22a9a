"""The `dlinoss` model through the pipeline: the exported ONNX (one LinossScan per layer, no
Loop/Scan in the main graph, fp32 state at the boundary of the fp16 graph), plain ONNX
Runtime, ORT equals torch, streaming step at a time equals the full run, checkpoints, and
`seqdeploy run dlinoss` end to end on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from conftest import run_cli

from seqdeploy import pipeline
from seqdeploy.artifacts import Artifact
from seqdeploy.checkpoint import load_checkpoint, save_checkpoint
from seqdeploy.parity import compare
from seqdeploy.plugins import load_registry
from seqdeploy.precision import cast_inputs
from seqdeploy.streaming import Stream

ROOT_ARGS = ["--device", "cpu"]
N_LAYERS, P, IN = 2, 8, 4       # the tiny preset


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """`seqdeploy run dlinoss --device cpu` once, in a fresh process with no GPU visible:
    export (with the one-step graphs), FP16, validate (long T = 4096), bench. The module's
    other tests read its artifact. Returns (root, completed process)."""
    root = tmp_path_factory.mktemp("exported")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", "from seqdeploy.cli import main; main()", "--out",
                          str(root), "--device", "cpu", "run", "dlinoss", "--preset", "tiny",
                          "--long-seq", "4096", "--no-plot"],
                         capture_output=True, text=True, timeout=900, env=env)
    return root, out


@pytest.fixture(scope="module")
def artifact_root(run_root):
    root, out = run_root
    assert out.returncode == 0, out.stderr[-2000:]
    return root


def art(root):
    return Artifact.load(root / "dlinoss" / "tiny")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx", "model.step.onnx",
                                  "model.step.fp16.onnx"])
def test_onnx_has_one_linoss_node_per_layer(artifact_root, name):
    model = onnx.load(str(art(artifact_root).path(name)))
    nodes = model.graph.node
    custom = [n for n in nodes if n.domain == "seqdeploy"]
    assert [n.op_type for n in custom] == ["LinossScan"] * N_LAYERS
    for n in custom:
        attrs = {a.name: a.s.decode() for a in n.attribute}
        assert attrs == {"plugin_namespace": "seqdeploy", "plugin_version": "1"}
    assert not [n for n in nodes if n.op_type in ("Loop", "Scan")]
    fn = {(f.domain, f.name): f for f in model.functions}[("seqdeploy", "LinossScan")]
    assert {n.domain for n in fn.node} <= {"", "ai.onnx"}
    assert "Scan" in [n.op_type for n in fn.node]
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    elem = onnx.TensorProto.FLOAT16 if "fp16" in name else onnx.TensorProto.FLOAT
    assert inputs["x"].type.tensor_type.elem_type == elem
    # the state crosses the boundary in fp32 in every graph
    assert inputs["state"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert outputs["state_out"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inputs["state"]) == ["batch", N_LAYERS, P, 4]
    step = "step" in name
    assert _dims(inputs["x"]) == (["batch", IN] if step else ["batch", "seq", IN])
    onnx.checker.check_model(model, full_check=True)


def test_plain_onnxruntime_runs_the_model_without_seqdeploy(artifact_root):
    """A fresh interpreter that imports only onnxruntime and numpy, fp32 and fp16 graphs."""
    paths = [str(art(artifact_root).path(n)) for n in ("model.onnx", "model.fp16.onnx")]
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        for path, dt in zip({paths!r}, (np.float32, np.float16)):
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            for b, t in [(1, 1), (3, 37)]:
                feeds = {{"x": np.random.randn(b, t, {IN}).astype(dt),
                          "state": np.zeros((b, {N_LAYERS}, {P}, 4), np.float32)}}
                y, state = s.run(None, feeds)
                assert y.shape == (b, t, {IN}) and y.dtype == dt and np.isfinite(y).all()
                assert state.shape == (b, {N_LAYERS}, {P}, 4) and state.dtype == np.float32
        assert not any(m.startswith("seqdeploy") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("precision,limit", [("fp32", 1e-4), ("fp16", 5e-3)])
def test_ort_equals_torch(artifact_root, precision, limit):
    registry = load_registry()
    artifact = art(artifact_root)
    arch = registry.architecture("dlinoss")
    inputs = arch.make_inputs(artifact.manifest["config"], 2, 300, seed=11)
    torch_s = pipeline.open_session(registry, artifact, "torch", precision, "cpu")
    # plain ONNX Runtime on the fallback functions (the native op library has no LinossScan)
    ort_s = pipeline.open_session(registry, artifact, "ort-onnx", precision, "cpu")
    ref_s = pipeline.open_session(registry, artifact, "torch-ref", "fp32", "cpu")
    inputs = cast_inputs(inputs, torch_s.input_specs, precision)
    assert inputs["state"].dtype == torch.float32
    a, b = torch_s.run(inputs), ort_s.run(inputs)
    ref = ref_s.run(cast_inputs(inputs, ref_s.input_specs, "fp32"))
    assert a["state_out"].dtype == b["state_out"].dtype == torch.float32
    for name in a:
        assert b[name].dtype == a[name].dtype
        assert compare(a[name], b[name]).rel_l2 < limit, name
        assert compare(ref[name], a[name]).rel_l2 < limit, name


@pytest.mark.parametrize("engine,precision", [("torch", "fp32"), ("torch", "fp16"),
                                              ("ort-onnx", "fp32"), ("ort-onnx", "fp16"),
                                              ("torch-ref", "fp32")])
def test_streaming_step_at_a_time_equals_full_run(artifact_root, engine, precision):
    registry = load_registry()
    artifact = art(artifact_root)
    arch = registry.architecture("dlinoss")
    config = artifact.manifest["config"]
    inputs = arch.make_inputs(config, 3, 40, seed=5)
    session = pipeline.open_session(registry, artifact, engine, precision, "cpu")
    inputs = cast_inputs(inputs, session.input_specs, precision)
    full = session.run(inputs)
    stream = Stream(registry, artifact, engine, precision, "cpu")
    stepped = pipeline.run_steps(stream, arch, inputs)
    assert stepped["state_out"].dtype == torch.float32
    limit = 1e-4 if precision == "fp32" else 5e-3
    for name in full:
        assert compare(full[name].float(), stepped[name].float()).rel_l2 < limit, name
    # and the split run through the session equals it too
    split = pipeline.run_split(session, arch, inputs, 17)
    for name in full:
        assert compare(full[name].float(), split[name].float()).rel_l2 < limit, name


def test_checkpoint_roundtrip_and_export_from_checkpoint(tmp_path, capsys):
    registry = load_registry()
    arch = registry.architecture("dlinoss")
    torch.manual_seed(123)
    model = arch.build(arch.config("tiny"))
    with torch.no_grad():
        model.blocks[0].A_raw.add_(0.25)
    save_checkpoint(model, tmp_path / "w.safetensors")
    other = load_checkpoint(arch.build(arch.config("tiny")), tmp_path / "w.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    code, _, err = run_cli(["--out", tmp_path / "ex", *ROOT_ARGS, "export", "dlinoss", "--preset",
                            "tiny", "--checkpoint", tmp_path / "w.safetensors"], capsys)
    assert code == 0, err
    exported = load_checkpoint(arch.build(arch.config("tiny")),
                               Artifact.load(tmp_path / "ex" / "dlinoss" / "tiny").path("model.safetensors"))
    assert torch.equal(exported.blocks[0].A_raw, model.blocks[0].A_raw)
    # the ONNX carries the checkpoint's weights: ORT equals the checkpoint's torch model
    registry = load_registry()
    artifact = Artifact.load(tmp_path / "ex" / "dlinoss" / "tiny")
    inputs = arch.make_inputs(arch.config("tiny"), 2, 20, seed=3)
    with torch.no_grad():
        want = model(inputs["x"], inputs["state"])
    got = pipeline.open_session(registry, artifact, "ort-onnx", "fp32", "cpu").run(inputs)
    assert compare(want[0], got["y"]).rel_l2 < 1e-5
    assert compare(want[1], got["state_out"]).rel_l2 < 1e-5
    bad = {k: v for k, v in model.state_dict().items() if k != "blocks.1.dt_raw"}
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, err = run_cli(["--out", tmp_path / "ex2", *ROOT_ARGS, "export", "dlinoss", "--preset",
                            "tiny", "--checkpoint", tmp_path / "bad.safetensors"], capsys)
    assert code == 2 and "missing key(s) blocks.1.dt_raw" in err


def test_fp16_policy_keeps_the_oscillators_fp32(artifact_root):
    registry = load_registry()
    session = pipeline.open_session(registry, art(artifact_root), "torch", "fp16", "cpu")
    params = dict(session.model.named_parameters())
    for name in ("A_raw", "G_raw", "dt_raw"):
        assert params[f"blocks.0.{name}"].dtype == torch.float32
    assert params["blocks.0.b_proj.weight"].dtype == torch.float16


def test_a_is_clamped_into_the_stable_band():
    from seqdeploy_dlinoss.model import LinossBlock
    from seqdeploy_dlinoss.ops import stable_band

    block = LinossBlock(8, 5)
    with torch.no_grad():
        block.A_raw.copy_(torch.tensor([-5.0, 0.0, 0.5, 1e4, 3.0]))
        block.G_raw.copy_(torch.tensor([0.5, -1.0, 0.2, 0.1, 2.0]))
    A, G, dt = block.oscillators()
    assert G[1] == 0.0 and bool((dt > 0).all() and (dt < 1).all())
    lo, hi = stable_band(G, dt)
    assert bool(((A >= lo) & (A <= hi)).all())
    assert torch.equal(A[2], torch.tensor(0.5)) or not (lo[2] <= 0.5 <= hi[2])


def test_run_end_to_end_on_cpu(run_root):
    root, out = run_root
    assert out.returncode == 0, out.stderr[-2000:]
    folder = root / "dlinoss" / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.onnx", "model.fp16.onnx", "model.step.onnx", "model.step.fp16.onnx",
            "parity.json", "bench.json"} <= set(manifest["files"])
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"]
    # the native ORT op library has a LinossScan kernel (ort_linoss_scan.cc): `run` keeps the
    # `ort` engine beside plain ORT on the fallback functions, nothing left out
    assert "left out" not in out.stderr and not parity["skipped"]
    engines = {"torch", "ort", "ort-onnx"}
    assert {(c["engine"], c["precision"]) for c in parity["checks"]} == \
        {(e, p) for e in engines for p in ("fp32", "fp16")}
    # FP16 limits hold at T = 4096
    long16 = [c for c in parity["checks"] if c["case"] == "B1-T4096" and c["precision"] == "fp16"]
    assert {c["engine"] for c in long16} == engines
    for c in long16:
        assert c["metrics"]["rel_l2"] <= 5e-3 and c["metrics"]["cosine"] >= 0.9999
    # every streaming engine, one step at a time, equals the full-sequence reference
    stepped = {(c["engine"], c["precision"]) for c in parity["checks"] if c["case"].endswith("-steps")}
    assert stepped == {(e, p) for e in engines for p in ("fp32", "fp16")}
    bench = json.loads((folder / "bench.json").read_text())
    assert {r["engine"] for r in bench["engines"]} >= {"torch-ref", "torch", "ort", "ort-onnx"}
    assert all(r["tokens_per_s"] > 0 for r in bench["engines"])
