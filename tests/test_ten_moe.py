"""ten with the moe plugin's Switch FFN (preset ``tiny-moe``) exposes its routes as lam's MoE
preset does: ``routes [B, T, L] int64``, an ``index`` output marked ``causal``, that every
other output ``depends_on``, so an fp16 near-tie that flips a route (the eigen state carries
the flip on) is reported as routing agreement instead of failing the float outputs. The
dense presets keep their three outputs."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from seqdeploy import pipeline
from seqdeploy.architecture import INDEX, ParityLimits
from seqdeploy.artifacts import Artifact
from seqdeploy.streaming import open_stream

DENSE = ["logits", "h_re_out", "h_im_out"]


def test_only_the_moe_preset_has_routes_and_they_are_each_layers_expert(registry):
    """Dense ``tiny``: three outputs, none depending on anything, the model returns three.
    ``tiny-moe``: ``routes`` last (int64, index, causal, [batch, seq, L]), every other output
    depends on it; its column l is layer l's expert, the argmax of that layer's router logits
    recomputed in float64 from the FFN's input."""
    arch = registry.architecture("ten")
    dense = arch.config("tiny")
    specs = arch.output_specs(dense)
    assert [s.name for s in specs] == DENSE and all(s.depends_on is None for s in specs)
    assert isinstance(arch.parity_limits("fp16", dense), ParityLimits)   # one limit, as before
    inputs = arch.make_inputs(dense, 2, 9, seed=1)
    with torch.no_grad():
        assert len(arch.build(dense).eval()(*inputs.values())) == 3

    config = arch.config("tiny-moe")
    specs = {s.name: s for s in arch.output_specs(config)}
    assert list(specs) == DENSE + ["routes"]
    routes = specs["routes"]
    assert (routes.kind, routes.dtype, routes.causal) == (INDEX, "int64", True)
    assert routes.shape == ("batch", "seq", config["n_layers"])
    assert all(specs[n].depends_on == "routes" for n in DENSE)
    assert arch.limits_for("fp16", config, "routes").min_agreement == 0.98
    assert arch.limits_for("fp32", config, "routes").min_agreement == 0.999
    assert arch.limits_for("fp32", config, "h_re_out").rel_l2 == 2e-5     # ten's own limits

    torch.manual_seed(0)
    model = arch.build(config).eval()
    seen = []
    hooks = [ffn.register_forward_hook(lambda m, args, out: seen.append((m, args[0])))
             for ffn in model.ffns]
    inputs = arch.make_inputs(config, 2, 40, seed=2)
    try:
        with torch.no_grad():
            logits, h_re, h_im, got = model(*inputs.values())
    finally:
        for h in hooks:
            h.remove()
    assert got.dtype == torch.int64 and got.shape == (2, 40, config["n_layers"])
    assert len(seen) == config["n_layers"]
    for layer, (block, x) in enumerate(seen):
        u = F.layer_norm(x.double(), x.shape[-1:], block.norm.weight.double(),
                         block.norm.bias.double(), block.norm.eps)
        want = (u @ block.router.weight.double().T).argmax(-1)
        assert torch.equal(got[..., layer], want), layer
    assert len(got.unique()) > 1


def test_export_optimize_validate_fp16_reports_routing_agreement(tmp_path, capsys, registry):
    """``seqdeploy export``, ``optimize`` and ``validate --precision fp16`` on ``tiny-moe``
    (CPU, the usable engines) exit 0. Both ONNX files end with an int64 ``routes`` output;
    every routes check in parity.json carries an agreement within the limit, and a float
    output is compared on fewer positions exactly where its routes disagree. The torch
    stream, one step at a time, equals the full run (routes included)."""
    base = ["--out", tmp_path, "--device", "cpu"]
    for stage in ("export", "optimize"):
        code, out, err = run_cli([*base, stage, "ten", "--preset", "tiny-moe"], capsys)
        assert code == 0, out + err
    directory = tmp_path / "ten" / "tiny-moe"
    for name in ("model.onnx", "model.fp16.onnx"):
        graph = onnx.load(str(directory / name)).graph
        assert [o.name for o in graph.output] == DENSE + ["routes"]
        assert graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.INT64

    code, out, err = run_cli([*base, "validate", "ten", "--preset", "tiny-moe", "--precision",
                              "fp16", "--long-seq", "64"], capsys)
    assert code == 0, out + err
    report = json.loads((directory / "parity.json").read_text())
    assert report["passed"]
    engines = {c["engine"] for c in report["checks"]}
    assert {"torch", "ort-onnx"} <= engines
    routes = {(c["engine"], c["case"]): c for c in report["checks"] if c["output"] == "routes"}
    assert {e for e, _ in routes} == engines and len(routes) >= 5 * len(engines)
    for (engine, case), check in routes.items():
        agreement = check["metrics"]["agreement"]
        assert check["precision"] == "fp16" and check["passed"]
        assert check["limits"]["min_agreement"] == 0.98 and 0.98 <= agreement <= 1.0
        logits = next(c for c in report["checks"]
                      if (c["engine"], c["case"], c["output"]) == (engine, case, "logits"))
        assert (logits["metrics"]["compared"] < 1.0) == (agreement < 1.0), (engine, case)

    arch = registry.architecture("ten")
    config = arch.config("tiny-moe")
    artifact = Artifact.load(directory)
    stream = open_stream(directory, engine="torch", device="cpu", registry=registry)
    inputs = arch.make_inputs(config, 2, 12, seed=8)
    full = pipeline.open_session(registry, artifact, "torch-ref", "fp32", "cpu").run(inputs)
    stepped = pipeline.run_steps(stream, arch, inputs)
    assert torch.equal(stepped["routes"], full["routes"])
    for name in DENSE:
        assert float((stepped[name] - full[name]).norm() / full[name].norm()) < 1e-5, name


@pytest.mark.parametrize("ffn", [None, {"kind": "dense"}])
def test_dense_ffn_configs_build_the_dense_model(registry, ffn):
    """No ``ffn`` and an explicit dense one are the same three-output model; an unknown kind
    is refused."""
    arch = registry.architecture("ten")
    config = {**arch.config("tiny"), "ffn": ffn}
    assert [s.name for s in arch.output_specs(config)] == DENSE
    assert not arch.build(config).routed
    with pytest.raises(ValueError, match="unknown ffn kind 'dense2'"):
        arch.build({**config, "ffn": {"kind": "dense2"}})
