"""The third-party fixture package (tests/fixtures/toy_plugin), pip-installed the way a user
installs a plugin, drives every hook: an architecture with a mask input, a streaming state,
an index output, a dependent output and a pooled output; an op with an int attribute and an
index output; an engine that streams; and a command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_model

from seqdeploy import pipeline
from seqdeploy.hookspecs import hookimpl
from seqdeploy.plugins import load_registry
from seqdeploy.streaming import open_stream

PACKAGE = Path(__file__).parent / "fixtures" / "toy_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The fixture package installed with pip into a folder of its own."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "toy_plugin"   # setuptools builds in the tree
    shutil.copytree(PACKAGE, source)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(target.glob("seqdeploy_toy-*.dist-info"))
    return target


def _seqdeploy(installed, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(installed), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SEQDEPLOY_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "seqdeploy", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_installed_package_registers_through_the_entry_point(installed):
    out = _seqdeploy(installed, "list", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    toy = next(p for p in data["plugins"] if p["name"] == "toy")
    assert toy["source"] == "entry-point" and toy["version"] == "0.1.0"
    assert sorted(toy["hooks"]) == ["register_architectures", "register_commands",
                                    "register_engines", "register_ops"]
    assert "toy" in [a["name"] for a in data["architectures"]]
    assert "toy_bucket" in [o["name"] for o in data["ops"]]
    assert "onnx-reference" in [e["name"] for e in data["engines"]]
    hello = _seqdeploy(installed, "toy-hello")
    assert (hello.returncode, hello.stdout.strip()) == (0, "hello from toy")


def test_run_validates_and_benches_on_every_engine_including_its_own(installed, tmp_path):
    out = _seqdeploy(installed, "--out", tmp_path, "run", "toy", "--long-seq", "256", "--no-plot")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "toy" / "tiny"
    parity = json.loads((folder / "parity.json").read_text())
    bench = json.loads((folder / "bench.json").read_text())
    engines = {c["engine"] for c in parity["checks"]}
    assert {"torch", "onnx-reference", "ort-onnx"} <= engines
    # seqdeploy's ORT library has no kernel for the toy's op: run leaves `ort` out, saying why
    assert "ort" not in engines
    assert "engine ort left out" in out.stderr or "skipping engine ort:" in out.stderr
    assert "onnx-reference" in {r["engine"] for r in bench["engines"]}
    assert parity["reference"].startswith("torch-ref")
    # its engine streams: the step-at-a-time case ran on it, in both precisions
    steps = [c for c in parity["checks"] if c["case"].endswith("-steps")
             and c["engine"] == "onnx-reference"]
    assert {c["precision"] for c in steps} == {"fp32", "fp16"}
    assert all(c["passed"] for c in parity["checks"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One exported toy/tiny artifact (fp32 and fp16, with the one-step graphs)."""
    registry = load_registry(["seqdeploy_toy"])
    artifact = pipeline.export(registry, "toy", "tiny", tmp_path_factory.mktemp("toy"),
                               streaming=True)
    pipeline.optimize_fp16(registry, artifact)
    return registry, artifact


def test_pooled_output_is_never_taken_for_a_final_state(toy):
    """A split run pools only its second half: comparing that with the full run would be
    wrong, so a split case must leave the pooled output out, and then it passes."""
    registry, artifact = toy
    arch = registry.architecture("toy")
    config = artifact.manifest["config"]
    session = pipeline.open_session(registry, artifact, "torch", "fp32", "cpu")
    inputs = arch.make_inputs(config, 2, 32, seed=3)
    full = session.run(inputs)
    split = pipeline.run_split(session, arch, inputs, 11)
    assert "pooled" not in split and set(split) == {"z", "bucket", "tail_out"}
    torch.testing.assert_close(split["z"], full["z"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["tail_out"], full["tail_out"])
    first = session.run({k: (v if k == "tail" else v[:, :11]) for k, v in inputs.items()})
    second = session.run({**{k: v[:, 11:] for k, v in inputs.items() if k != "tail"},
                          "tail": first["tail_out"]})
    # the second call's own pooled output is not the sequence's: treating it as a state fails
    assert not torch.allclose(second["pooled"], full["pooled"], rtol=1e-3, atol=1e-3)
    result = pipeline.validate(registry, artifact, ["torch", "onnx-reference"], ["fp32"],
                               device="cpu", long_seq=64)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    by_case = {}
    for c in result["checks"]:
        by_case.setdefault(c["case"], set()).add(c["output"])
    split_case = next(k for k in by_case if "split" in k)
    assert "pooled" not in by_case[split_case] and "pooled" in by_case["B2-T63"]
    assert "pooled" not in by_case["B2-T32-steps"]


def test_index_outputs_are_compared_by_agreement_and_dependants_where_routes_agree(toy):
    from seqdeploy.parity import check_outputs

    registry, artifact = toy
    arch = registry.architecture("toy")
    config = artifact.manifest["config"]
    specs = arch.output_specs(config)
    session = pipeline.open_session(registry, artifact, "torch", "fp32", "cpu")
    ref = session.run(arch.make_inputs(config, 2, 20, seed=5))
    out = {k: v.clone() for k, v in ref.items()}
    flip = (0, 4)
    out["bucket"][flip] = (out["bucket"][flip] + 1) % config["buckets"]
    out["z"][flip] += 100.0                       # what follows a flipped route differs
    limits = lambda name: arch.limits_for("fp16", config, name)  # noqa: E731
    checks = {c.output: c for c in check_outputs("x", "fp16", "c", ref, out, specs, limits)}
    assert checks["bucket"].metrics.agreement == pytest.approx(39 / 40)
    assert checks["bucket"].passed                 # 0.975 >= 0.97
    assert checks["z"].passed and checks["z"].metrics.compared == pytest.approx(39 / 40)
    out["z"][(1, 2)] += 1.0                        # a difference where routes agree fails
    checks = {c.output: c for c in check_outputs("x", "fp16", "c", ref, out, specs, limits)}
    assert not checks["z"].passed
    strict = lambda name: arch.limits_for("fp32", config, name)  # noqa: E731
    checks = {c.output: c for c in check_outputs("x", "fp32", "c", ref, out, specs, strict)}
    assert not checks["bucket"].passed and "agreement" in checks["bucket"].as_dict()["reason"]


def test_padding_is_excluded_and_a_ragged_case_runs_rows_alone(toy):
    registry, artifact = toy
    result = pipeline.validate(registry, artifact, ["torch"], ["fp32"], device="cpu", long_seq=64)
    cases = {c["case"] for c in result["checks"]}
    assert "B3-T32-ragged" in cases
    assert {"B3-T32-ragged-row0-alone", "B3-T32-ragged-row2-alone"} <= cases
    ragged = [c for c in result["checks"] if c["case"] == "B3-T32-ragged" and c["output"] == "z"]
    assert ragged and ragged[0]["metrics"]["compared"] < 1.0     # padded steps left out


def test_the_op_exports_with_its_int_attribute_and_runs_in_onnxruntime(toy):
    import onnxruntime

    registry, artifact = toy
    model = onnx.load(str(artifact.path("model.onnx")))
    nodes = [n for n in model.graph.node if n.domain == "seqdeploy"]
    assert [n.op_type for n in nodes] == ["ToyBucket"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["n"] == 3 and attrs["plugin_namespace"] == b"seqdeploy"
    from seqdeploy_toy.ops import naive_toy_bucket

    x = torch.randn(2, 9, 4)
    x[0, 3, :3] = 1.5                              # a tie: the lowest index wins
    fn = next(f for f in model.functions if f.name == "ToyBucket")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ToyBucket", ["x"], ["ids"], domain="seqdeploy", n=3)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 9, 4])],
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 9])])
    alone = make_model(graph, functions=[fn], opset_imports=[
        onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid("seqdeploy", 1)])
    ids = onnxruntime.InferenceSession(alone.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert (torch.from_numpy(ids) == naive_toy_bucket(x, 3)).all()
    assert ids[0, 3] == 0


def test_third_party_engine_streams(toy):
    registry, artifact = toy
    stream = open_stream(artifact.dir, engine="onnx-reference", registry=registry, device="cpu")
    arch = registry.architecture("toy")
    inputs = arch.make_inputs(artifact.manifest["config"], 1, 5, seed=2)
    stream.reset(batch=1, state={"tail": inputs["tail"]})
    zs = [stream.step({"x": inputs["x"][:, t], "attention_mask": inputs["attention_mask"][:, t]})["z"]
          for t in range(5)]
    full = pipeline.open_session(registry, artifact, "torch", "fp32", "cpu").run(inputs)
    torch.testing.assert_close(torch.stack(zs, 1), full["z"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stream.state["tail"], full["tail_out"])


class _Wrapper:
    """A plugin whose hook wraps every other implementation (pluggy's ``wrapper=True``)."""

    def __init__(self):
        self.seen_after = None

    @hookimpl(wrapper=True)
    def register_engines(self, register):
        result = yield
        self.seen_after = True
        return result


def test_hooks_are_called_through_pluggy_so_wrappers_apply():
    from seqdeploy.plugins import call_hook

    registry = load_registry(["seqdeploy_toy"])
    wrapper = _Wrapper()
    registry.pm.register(wrapper, name="wrapper")
    names = []
    call_hook(registry, "register_engines", register=lambda: (names.append, lambda: None))
    assert wrapper.seen_after and {"torch", "onnx-reference"} <= set(e.name for e in names)


def test_register_commands_never_mutates_a_shared_group(capsys):
    from seqdeploy.cli import build_cli

    with_toy = build_cli(load_registry(["seqdeploy_toy"]))
    without = build_cli(load_registry())
    assert "toy-hello" in with_toy.commands and "toy-hello" not in without.commands
