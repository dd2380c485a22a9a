"""lam with the moe plugin's Switch FFN (config ``ffn={"kind": "moe", ...}``, preset
``tiny-moe``): each layer's FFN against the float64 router and experts loops, padding changes
nothing (it takes no expert capacity), split and step-at-a-time runs equal the full run, and
``seqdeploy export`` then ``validate`` on CPU: one DualDeltaRule, Top1Router and MoEExperts
node per layer, plain ONNX Runtime equal to torch, routes compared by agreement."""
from __future__ import annotations

import copy
import dataclasses

import onnx
import pytest
import torch
from conftest import run_cli
from test_lam_model import close
from test_lam_model import run as run_lam

from seqdeploy import pipeline
from seqdeploy.architecture import INDEX, ParityLimits, TensorSpec
from seqdeploy.checkpoint import load_checkpoint, save_checkpoint
from seqdeploy.errors import ArtifactError, SeqdeployError
from seqdeploy.parity import check_outputs
from seqdeploy.plugins import load_registry

NAMES = ("token_states", "embedding", "memory_out", "conv_out", "routes")


@pytest.fixture(scope="module")
def lam_moe():
    registry = load_registry()
    arch = registry.architecture("lam")
    config = arch.config("tiny-moe")
    torch.manual_seed(0)
    return registry, arch, config, arch.build(config).eval()


def with_capacity(model, capacity_factor: float):
    """The same weights with every MoE FFN's capacity factor changed."""
    model = copy.deepcopy(model)
    for ffn in model.ffns:
        ffn.capacity_factor = capacity_factor
    return model


def run(model, inputs) -> dict[str, torch.Tensor]:
    return run_lam(model, inputs, NAMES)


def float64_switch_ffn(block, x: torch.Tensor, capacity_factor: float):
    """``x [1, n, d]`` (one row's real tokens) through the block in float64: LayerNorm, router
    logits, the float64 router and experts loops of the moe plugin.
    ``(x + y, expert [n], number of tokens dropped)``."""
    from seqdeploy_moe.experts import naive_moe_experts
    from seqdeploy_moe.router import naive_top1_router

    x = x.double()
    u = torch.nn.functional.layer_norm(x, x.shape[-1:], block.norm.weight.double(),
                                       block.norm.bias.double(), block.norm.eps)
    expert, gate = naive_top1_router(u @ block.router.weight.double().T, capacity_factor)
    y = naive_moe_experts(u, expert, gate, block.w1, block.b1, block.w2, block.b2)
    return x + y, expert[0], int((gate == 0).sum())


def test_preset_swaps_every_ffn_for_the_moe_block(lam_moe):
    from seqdeploy_moe.model import MoEFeedForward

    registry, arch, config, model = lam_moe
    assert all(isinstance(f, MoEFeedForward) for f in model.ffns)
    assert [f.n_experts for f in model.ffns] == [4, 4] and model.ffns[0].w1.shape == (4, 64, 128)
    assert [s.name for s in arch.output_specs(config)] == list(NAMES)
    assert [s.name for s in arch.output_specs(arch.config("tiny"))] == list(NAMES[:4])
    with pytest.raises(ValueError, match="unknown ffn kind 'dense2'"):
        arch.build({**config, "ffn": {"kind": "dense2"}})


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_each_ffn_equals_the_float64_loops_on_the_real_tokens(lam_moe, capacity_factor):
    """Every layer's FFN, fed the mixer's output of a batch with left, right and inner
    padding, equals the float64 loops run on each row's real tokens alone; ``routes`` holds
    those choices (-1 at padding). With cf 1.0 some tokens are dropped."""
    _, arch, config, model = lam_moe
    model = with_capacity(model, capacity_factor)
    inputs = arch.make_inputs(config, 3, 40, seed=11)
    mask = inputs["attention_mask"]
    mask[0, 31:] = 0
    mask[1, :7] = 0
    mask[2, [3, 17, 18]] = 0
    seen = []
    hooks = [ffn.register_forward_hook(lambda m, a, kw, out: seen.append((m, a[0], kw["mask"], out)),
                                       with_kwargs=True) for ffn in model.ffns]
    try:
        out = run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == config["n_layers"]
    dropped = 0
    for layer, (block, x, layer_mask, (y, expert)) in enumerate(seen):
        assert torch.equal(layer_mask, mask)
        assert torch.equal(out["routes"][..., layer], expert)
        for b in range(3):
            real = mask[b].bool()
            with torch.no_grad():
                want, want_expert, n = float64_switch_ffn(block, x[b:b + 1, real], capacity_factor)
            assert torch.equal(expert[b, real], want_expert), (layer, b)
            assert close(y[b:b + 1, real].double(), want, 1e-6), (layer, b)
            assert (expert[b, ~real] == -1).all()
            dropped += n
    assert (dropped > 0) == (capacity_factor > 0)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_padding_changes_nothing(lam_moe, capacity_factor):
    """Right-padded rows of a batch equal each row run alone, and left padding from a zero
    state changes no real output: padded tokens take no capacity, so this holds with a
    capacity factor that drops tokens too (cf 1.0 changes the outputs: tokens are dropped)."""
    _, arch, config, model = lam_moe
    model = with_capacity(model, capacity_factor)
    inputs = arch.make_inputs(config, 3, 50, seed=1, ragged=True)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1
    batch = run(model, inputs)
    if capacity_factor:
        assert not close(batch["token_states"], run(with_capacity(model, 0.0), inputs)["token_states"])
    for i, length in enumerate(lengths):
        alone = run(model, {k: (v[i:i + 1, :length] if k in ("input_ids", "attention_mask")
                                else v[i:i + 1]) for k, v in inputs.items()})
        assert torch.equal(batch["routes"][i:i + 1, :length], alone["routes"]), i
        assert (batch["routes"][i, length:] == -1).all()
        assert close(batch["token_states"][i:i + 1, :length], alone["token_states"]), i
        for name in NAMES[1:4]:
            assert close(batch[name][i:i + 1], alone[name]), (i, name)

    one = arch.make_inputs(config, 1, 30, seed=2)
    zero = {"memory": torch.zeros_like(one["memory"]), "conv": torch.zeros_like(one["conv"])}
    alone = run(model, {**one, **zero})
    pad = 9
    ids = torch.cat([torch.randint(0, config["vocab"], (1, pad)), one["input_ids"]], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.int64), one["attention_mask"]], 1)
    padded = run(model, {"input_ids": ids, "attention_mask": mask, **zero})
    assert torch.equal(padded["routes"][:, pad:], alone["routes"])
    assert close(padded["token_states"][:, pad:], alone["token_states"])
    for name in NAMES[1:4]:
        assert close(padded[name], alone[name]), name


def test_split_equals_full(lam_moe):
    """Two calls with the state passed across equal one (one step at a time: the stream in
    :func:`test_export_then_validate_on_cpu`)."""
    _, arch, config, model = lam_moe
    T = 24
    inputs = arch.make_inputs(config, 2, T, seed=4)
    full = run(model, inputs)
    for cuts in ([11], [3, 4, 17]):
        state = {"memory": inputs["memory"], "conv": inputs["conv"]}
        pieces = []
        for a, b in zip([0, *cuts], [*cuts, T]):
            out = run(model, {"input_ids": inputs["input_ids"][:, a:b],
                              "attention_mask": inputs["attention_mask"][:, a:b], **state})
            pieces.append(out)
            state = {"memory": out["memory_out"], "conv": out["conv_out"]}
        assert torch.equal(torch.cat([p["routes"] for p in pieces], 1), full["routes"])
        assert close(torch.cat([p["token_states"] for p in pieces], 1), full["token_states"])
        assert close(state["memory"], full["memory_out"]) and close(state["conv"], full["conv_out"])


def test_a_causal_route_flip_excludes_the_rest_of_its_row():
    """Core v2 parity with ``causal`` routes: after the first step whose ids disagree, a
    dependant is not compared in that row (a recurrence carries the flip on); before it and
    in other rows it is."""
    specs = [TensorSpec("y", "float", ("batch", "seq", 3), depends_on="r"),
             TensorSpec("r", "int64", ("batch", "seq", 2), kind=INDEX, causal=True)]
    limits = {"y": ParityLimits(rel_l2=1e-6), "r": ParityLimits(rel_l2=0.0, min_agreement=0.9)}
    g = torch.Generator().manual_seed(0)
    ref = {"y": torch.randn(2, 10, 3, generator=g), "r": torch.randint(0, 4, (2, 10, 2), generator=g)}
    out = {k: v.clone() for k, v in ref.items()}
    out["r"][0, 6, 1] = (out["r"][0, 6, 1] + 1) % 4
    out["y"][0, 6:] += 1.0                   # the flip and everything after it in row 0

    def checks(specs=specs):
        return {c.output: c for c in check_outputs("x", "fp16", "c", ref, out, specs, limits.get)}

    got = checks()
    assert got["r"].passed and got["r"].metrics.agreement == pytest.approx(39 / 40)
    assert got["y"].passed and got["y"].metrics.compared == pytest.approx(16 / 20)
    per_step = checks([specs[0], dataclasses.replace(specs[1], causal=False)])["y"]
    assert not per_step.passed and per_step.metrics.compared == pytest.approx(19 / 20)
    out["y"][1, 9] += 1e-3                   # the other row is compared to its end
    assert not checks()["y"].passed
    out["y"][1, 9] = ref["y"][1, 9]
    out["y"][0, 5] += 1e-3                   # and row 0 up to the flip
    assert not checks()["y"].passed
    with pytest.raises(SeqdeployError, match="only an index tensor can be causal"):
        TensorSpec("y", "float", ("batch", "seq"), causal=True)


# -- the exported artifact -------------------------------------------------------------------
def test_export_then_validate_on_cpu(tmp_path, capsys, lam_moe):
    """``seqdeploy export lam --preset tiny-moe`` then ``seqdeploy validate`` (fp32, the usable
    engines: torch and plain ONNX Runtime) exit 0. The graph holds one DualDeltaRule,
    Top1Router and MoEExperts node per layer, no Loop or Scan; the checkpoint holds the
    exported weights; plain ONNX Runtime equals torch within the plugin's limits, with
    padding; the torch stream one step at a time equals the full run."""
    registry, arch, config, _ = lam_moe
    base = ["--out", tmp_path, "--device", "cpu"]
    code, out, err = run_cli([*base, "export", "lam", "--preset", "tiny-moe"], capsys)
    assert code == 0, out + err
    assert "'DualDeltaRule': 2, 'MoEExperts': 2, 'Top1Router': 2" in out
    artifact_dir = tmp_path / "lam" / "tiny-moe"

    model = onnx.load(str(artifact_dir / "model.onnx"))
    kinds = sorted(n.op_type for n in model.graph.node if n.domain == "seqdeploy")
    assert kinds == ["DualDeltaRule"] * 2 + ["MoEExperts"] * 2 + ["Top1Router"] * 2
    assert not [n for n in model.graph.node if n.op_type in ("Loop", "Scan", "If")]
    assert {"DualDeltaRule", "MoEExperts", "Top1Router"} <= {f.name for f in model.functions}
    assert [o.name for o in model.graph.output] == list(NAMES)

    # the checkpoint is what was exported: a model of another seed loaded from it equals ORT
    torch.manual_seed(123)
    loaded = arch.build(config).eval()
    load_checkpoint(loaded, artifact_dir / "model.safetensors")
    from seqdeploy.artifacts import Artifact

    artifact = Artifact.load(artifact_dir)
    session = pipeline.open_session(registry, artifact, "ort-onnx", "fp32", "cpu")
    inputs = arch.make_inputs(config, 3, 45, seed=7, ragged=True)
    want = run(loaded, inputs)
    got = {k: v.cpu() for k, v in session.run(inputs).items()}
    checks = check_outputs("ort-onnx", "fp32", "c", want, got, arch.output_specs(config),
                           lambda name: arch.limits_for("fp32", config, name),
                           inputs["attention_mask"])
    assert [c.output for c in checks if not c.passed] == []
    assert {c.output: c.metrics.agreement for c in checks}["routes"] == 1.0
    assert len(want["routes"][inputs["attention_mask"].bool()].unique()) > 1
    dense = arch.build(arch.config("tiny"))
    save_checkpoint(dense, tmp_path / "dense.safetensors")
    with pytest.raises(ArtifactError, match="missing key"):
        load_checkpoint(arch.build(config), tmp_path / "dense.safetensors")

    from seqdeploy.streaming import open_stream

    stream = open_stream(artifact_dir, engine="torch", device="cpu", registry=registry)
    inputs = arch.make_inputs(config, 2, 16, seed=8)
    full = run(loaded, inputs)
    stepped = pipeline.run_steps(stream, arch, inputs)
    assert torch.equal(stepped["routes"], full["routes"])
    for name in ("token_states", "memory_out", "conv_out"):
        assert close(stepped[name], full[name], 1e-5), name

    code, out, err = run_cli([*base, "validate", "lam", "--preset", "tiny-moe", "--precision",
                              "fp32", "--long-seq", "64"], capsys)
    assert code == 0, out + err
    assert "routes" in out and "ort-onnx" in out and "FAIL" not in out
    assert "B3-T128-ragged-row2-alone" in out


def test_capacity_over_real_tokens_exports_to_standard_onnx_ops(lam_moe):
    """With cf > 0 the capacity counted over the real tokens is standard ONNX ops around the
    Top1Router node: plain ONNX Runtime drops the same tokens as torch (one small layer)."""
    import onnxruntime as ort

    from seqdeploy.export import export_onnx

    registry, arch, _, _ = lam_moe
    config = {"vocab": 32, "d_model": 16, "n_heads": 1, "n_layers": 1, "seq_len": 16,
              "ffn": {"kind": "moe", "n_experts": 2, "d_ff": 16, "capacity_factor": 0.8}}
    torch.manual_seed(0)
    model = arch.build(config).eval()
    proto, summary = export_onnx(arch, config, model, "fp32", registry)
    assert summary["custom_nodes"] == {"DualDeltaRule": 1, "MoEExperts": 1, "Top1Router": 1}
    assert summary["control_flow"] == 0
    inputs = arch.make_inputs(config, 3, 21, seed=5, ragged=True)
    inputs["attention_mask"][1, :4] = 0
    want = run(model, inputs)
    assert not close(want["token_states"], run(with_capacity(model, 0.0), inputs)["token_states"])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(NAMES, session.run(None, {k: v.numpy() for k, v in inputs.items()})))
    assert torch.equal(torch.from_numpy(got["routes"]), want["routes"])
    real = inputs["attention_mask"].bool()
    assert close(torch.from_numpy(got["token_states"])[real], want["token_states"][real], 1e-5)
