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
