"""The precision policy at the graph boundary: in fp16 graphs the recurrent state enters and
leaves in fp32, so a stream that carries it over thousands of calls does not round it to
fp16 at every call."""
from __future__ import annotations

import onnx
import pytest
import torch

from seqdeploy import pipeline
from seqdeploy.parity import check_outputs
from seqdeploy.plugins import load_registry
from seqdeploy.streaming import open_stream

STEPS = 4096


@pytest.fixture(scope="module")
def ten_streaming(tmp_path_factory):
    registry = load_registry()
    artifact = pipeline.export(registry, "ten", "tiny", tmp_path_factory.mktemp("ten"),
                               streaming=True)
    pipeline.optimize_fp16(registry, artifact)
    return registry, artifact


@pytest.mark.parametrize("name", ["model.fp16.onnx", "model.step.fp16.onnx"])
def test_fp16_graphs_keep_the_state_fp32_at_the_boundary(ten_streaming, name):
    registry, artifact = ten_streaming
    graph = onnx.load(str(artifact.path(name))).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    arch = registry.architecture("ten")
    for state_in, state_out in arch.state_map.items():
        assert dtypes[state_in] == onnx.TensorProto.FLOAT, state_in
        assert dtypes[state_out] == onnx.TensorProto.FLOAT, state_out
    assert dtypes["logits"] == onnx.TensorProto.FLOAT16


def test_a_long_fp16_stream_stays_within_the_fp16_limits(ten_streaming):
    """4096 single steps through the fp16 one-step graph against the fp32 reference run of
    the whole sequence: within the fp16 parity limits of every output."""
    registry, artifact = ten_streaming
    arch = registry.architecture("ten")
    config = artifact.manifest["config"]
    inputs = arch.make_inputs(config, 1, STEPS, seed=11)
    reference = pipeline.open_session(registry, artifact, "torch", "fp32", "cpu").run(inputs)
    stream = open_stream(artifact.dir, engine="ort", precision="fp16", registry=registry,
                         device="cpu", check_values=False)
    stream.reset(batch=1, state={k: inputs[k] for k in arch.state_map})
    logits = [stream.step({"input_ids": inputs["input_ids"][:, t]})["logits"]
              for t in range(STEPS)]
    out = {"logits": torch.stack(logits, 1),
           **{arch.state_map[k]: v for k, v in stream.state.items()}}
    assert all(v.dtype == torch.float32 for v in stream.state.values())
    checks = check_outputs("ort", "fp16", "steps", reference, out, arch.output_specs(config),
                           lambda n: arch.limits_for("fp16", config, n))
    assert all(c.passed for c in checks), [(c.output, c.as_dict()["reason"]) for c in checks]


def test_onnx_files_hold_no_path_of_the_build_machine_and_describe_themselves(ten_streaming):
    import os
    import sys

    import seqdeploy

    registry, artifact = ten_streaming
    places = {os.getcwd(), sys.prefix, os.path.expanduser("~"), str(artifact.dir.resolve()),
              os.path.dirname(seqdeploy.__file__), os.path.dirname(torch.__file__)}
    for name in ("model.onnx", "model.fp16.onnx", "model.step.onnx", "model.step.fp16.onnx"):
        data = artifact.path(name).read_bytes()
        for place in places:
            assert place.encode() not in data, (name, place)
        assert b"stack_trace" not in data and b".py:" not in data, name
        model = onnx.load(str(artifact.path(name)))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["seqdeploy.arch"] == "ten" and meta["seqdeploy.preset"] == "tiny"
        assert meta["seqdeploy.version"] == model.producer_version == seqdeploy.__version__
        assert "h_re_out" in meta["seqdeploy.state.h_re"]
        assert all(v.doc_string for v in (*model.graph.input, *model.graph.output))
