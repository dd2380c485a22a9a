"""The Switch encoder: export (one Top1Router and one MoEExperts node per layer, no control
flow), plain ONNX Runtime equals torch, the CLI end to end, and the training-time pieces
(jitter, differentiable path, auxiliary losses)."""
from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli

from seqdeploy.ops import reference_ops
from seqdeploy_moe.model import (MoEFeedForward, SwitchEncoder, auxiliary_losses,
                                 load_balance_loss, router_z_loss)


@pytest.fixture(scope="module")
def moe_artifact(tmp_path_factory):
    from seqdeploy import pipeline
    from seqdeploy.plugins import load_registry

    root = tmp_path_factory.mktemp("exported")
    registry = load_registry()
    pipeline.export(registry, "moe", "tiny", root)
    return root / "moe" / "tiny"


def test_export_holds_one_router_and_one_experts_node_per_layer(moe_artifact, registry):
    model = onnx.load(str(moe_artifact / "model.onnx"))
    layers = registry.architecture("moe").config("tiny")["n_layers"]
    custom = [n for n in model.graph.node if n.domain == "seqdeploy"]
    assert sorted(n.op_type for n in custom) == ["MoEExperts"] * layers + ["Top1Router"] * layers
    assert not [n for n in model.graph.node if n.op_type in ("Loop", "Scan", "If")]
    for fn in model.functions:          # the fallbacks are control-flow free too
        assert not [n for n in fn.node if n.op_type in ("Loop", "Scan", "If")], fn.name
    for node in custom:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_namespace"].s == b"seqdeploy"
        if node.op_type == "Top1Router":
            assert attrs["capacity_factor"].type == onnx.AttributeProto.FLOAT


def test_plain_onnxruntime_equals_torch(moe_artifact, registry):
    """The fallback functions run the model in ONNX Runtime with no seqdeploy kernels."""
    from seqdeploy.checkpoint import load_checkpoint

    arch = registry.architecture("moe")
    config = arch.config("tiny")
    model = arch.build(config).eval()
    load_checkpoint(model, moe_artifact / "model.safetensors")
    inputs = arch.make_inputs(config, 3, 45, seed=7)
    with torch.no_grad():
        logits, routes = model(*inputs.values())
        with reference_ops():
            ref_logits, ref_routes = model(*inputs.values())
    assert torch.equal(routes, ref_routes)
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < 1e-5
    session = ort.InferenceSession(str(moe_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    out_logits, out_routes = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert torch.equal(torch.from_numpy(out_routes), routes)
    assert routes.shape == (3, 45, config["n_layers"]) and len(routes.unique()) > 1
    out = torch.from_numpy(out_logits)
    assert float((out - logits).norm() / logits.norm()) < 1e-5


def test_cli_run_end_to_end_on_cpu(tmp_path, capsys):
    """``seqdeploy run moe``: export, FP16, validate (every usable engine, fp32 and fp16, routes
    by agreement, logits where routes agree) and bench; exit 0. The usable engines include
    ``ort``: the op library has kernels for both moe ops."""
    code, out, err = run_cli(["run", "moe", "--out", tmp_path, "--device", "cpu",
                              "--long-seq", "64", "--no-plot"], capsys)
    assert code == 0, out + err
    assert "routes" in out and "ort-onnx" in out and "FAIL" not in out
    # the routing agreement is in the table, per engine and case (100.00% agree in fp32)
    assert "% agree" in out and "100.00% agree" in out
    assert "│ ort " in out and "skipping engine ort:" not in err
    assert "Top1Router': 2" in out and "MoEExperts': 2" in out


def test_complexity_input_moves_the_router():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, 4, complexity=True).eval()
    u = torch.randn(1, 6, 16)
    c0, c1 = torch.zeros(1, 6), torch.ones(1, 6)
    delta = block.router_logits(u, c1) - block.router_logits(u, c0)
    assert torch.allclose(delta, block.router_complexity.detach().expand(1, 6, 4))
    with pytest.raises(ValueError, match="pass c"):
        block(u)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.8])
def test_a_padded_row_routes_as_its_real_tokens_alone(capacity_factor):
    """With a mask, each row equals the float64 router and experts loops run on its real
    tokens only: padding (at the start, the end and inside a row) takes no capacity, runs no
    expert (output = residual) and reports expert -1. cf 0.8 over E=2 drops tokens, and the
    capacity is ``ceil(0.8 * n_real / 2)`` in fp32 (n_real = 5 gives 2, not 3)."""
    from seqdeploy_moe.experts import naive_moe_experts
    from seqdeploy_moe.router import naive_top1_router

    torch.manual_seed(3)
    block = MoEFeedForward(16, 24, 2, capacity_factor).eval()
    T = 13
    x = torch.randn(3, T, 16)
    mask = torch.ones(3, T, dtype=torch.int64)
    mask[0, 5:] = 0                 # right padding: 5 real tokens
    mask[1, :6] = 0                 # left padding
    mask[2, [1, 4, 5, 9]] = 0       # holes
    with torch.no_grad():
        y, expert = block(x, mask=mask)
    dropped = []
    for b in range(3):
        real = mask[b].bool()
        xr = x[b:b + 1, real].double()
        with torch.no_grad():
            u = torch.nn.functional.layer_norm(xr, (16,), block.norm.weight.double(),
                                               block.norm.bias.double(), block.norm.eps)
            want_e, want_g = naive_top1_router(u @ block.router.weight.double().T, capacity_factor)
            want = xr + naive_moe_experts(u, want_e, want_g, block.w1, block.b1, block.w2, block.b2)
        assert torch.equal(expert[b, real], want_e[0])
        got = y[b:b + 1, real].double()
        assert float((got - want).norm() / want.norm()) < 1e-6, b
        assert torch.equal(y[b, ~real], x[b, ~real]) and (expert[b, ~real] == -1).all()
        dropped.append(int((want_g == 0).sum()))
        if b == 0 and capacity_factor:     # 5 real tokens: cap 2 (3 would drop fewer here)
            counts = torch.bincount(want_e[0], minlength=2)
            assert counts.max() >= 3 and dropped[0] == int((counts - 2).clamp(min=0).sum())
    if capacity_factor:
        assert sum(dropped) > dropped[0]
    else:
        assert sum(dropped) == 0
    if capacity_factor:              # without the mask the op counts the padding: row 1 differs
        with torch.no_grad():
            unmasked = block(x)[0]
        assert not torch.allclose(unmasked[1, 6:], y[1, 6:])
    block.train()                    # the auxiliary losses see the real tokens only
    y_train, _ = block(x, mask=mask)
    assert torch.allclose(y_train, y, atol=1e-6)
    assert block.last_logits.shape == (int(mask.sum()), 2)
    assert torch.equal(block.last_expert, expert[mask.bool()])


def test_jitter_only_in_training():
    torch.manual_seed(1)
    block = MoEFeedForward(16, 32, 4, jitter=0.1)
    u = torch.randn(2, 5, 16)
    block.eval()
    assert torch.equal(block.router_logits(u), block.router_logits(u))
    block.train()
    a, b = block.router_logits(u), block.router_logits(u)
    assert not torch.equal(a, b)
    clean = torch.nn.functional.linear(u, block.router.weight)
    ratio = (a - clean).abs().max() / (u.abs().sum(-1).max() * block.router.weight.abs().max())
    assert ratio <= 0.1 + 1e-6          # at most epsilon of each product


def test_training_forward_is_differentiable_and_matches_inference():
    torch.manual_seed(2)
    model = SwitchEncoder(64, 16, 32, 4, 2, 2, capacity_factor=1.0)
    ids = torch.randint(0, 64, (2, 12))
    model.eval()
    with torch.no_grad():
        want, want_routes = model(ids)
    model.train()
    logits, routes = model(ids)
    assert torch.equal(routes, want_routes)
    assert float((logits.detach() - want).norm() / want.norm()) < 1e-5
    losses = auxiliary_losses(model)
    (logits.square().mean() + 0.01 * losses["load_balance"] + 1e-3 * losses["z_loss"]).backward()
    for p in (model.moes[0].router.weight, model.moes[0].w1, model.moes[1].w2):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_auxiliary_losses_against_hand_values():
    E = 4
    # perfect balance, uniform probabilities: f_i = P_i = 1/E -> E * E * 1/E^2 = 1
    logits = torch.zeros(8, E)
    expert = torch.arange(8) % E
    assert math.isclose(float(load_balance_loss(logits, expert)), 1.0, rel_tol=1e-6)
    # all tokens on expert 0 with p_0 = 1: E * 1 * 1 = E
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]]).expand(8, E)
    assert math.isclose(float(load_balance_loss(peaked, torch.zeros(8, dtype=torch.int64))), E,
                        rel_tol=1e-6)
    # z-loss: logsumexp of zeros is log E
    assert math.isclose(float(router_z_loss(logits)), math.log(E) ** 2, rel_tol=1e-6)


def test_ten_preset_with_the_moe_ffn_exports_and_runs_in_plain_onnxruntime(tmp_path, registry):
    """ten's tiny-moe preset: every FFN is the Switch block; one router and one experts node
    per layer beside the EigenScan nodes, and plain ORT equals torch."""
    from seqdeploy import pipeline
    from seqdeploy.checkpoint import load_checkpoint

    pipeline.export(registry, "ten", "tiny-moe", tmp_path)
    directory = tmp_path / "ten" / "tiny-moe"
    model = onnx.load(str(directory / "model.onnx"))
    kinds = sorted(n.op_type for n in model.graph.node if n.domain == "seqdeploy")
    assert kinds == ["EigenScan"] * 2 + ["MoEExperts"] * 2 + ["Top1Router"] * 2
    arch = registry.architecture("ten")
    config = arch.config("tiny-moe")
    torch_model = arch.build(config).eval()
    load_checkpoint(torch_model, directory / "model.safetensors")
    inputs = arch.make_inputs(config, 2, 19, seed=3)
    with torch.no_grad():
        want = torch_model(*inputs.values())[0]
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_matches_cpu():
    """The whole encoder with the Triton kernels (fp32) against the CPU forms."""
    torch.manual_seed(5)
    model = SwitchEncoder(128, 64, 128, 8, 2, 4, capacity_factor=1.25, complexity=True).eval()
    ids = torch.randint(0, 128, (3, 200))
    c = torch.rand(3, 200)
    with torch.no_grad():
        want, want_routes = model(ids, c)
        got, routes = model.cuda()(ids.cuda(), c.cuda())
    assert float((routes.cpu() == want_routes).float().mean()) >= 0.99
    agree = (routes.cpu() == want_routes).all(-1)
    err = (got.cpu()[agree] - want[agree]).norm() / want[agree].norm()
    assert float(err) < 1e-4


def test_capacity_factor_passes_through_export(registry):
    """A non-default capacity factor reaches the ONNX attribute, and plain ORT drops the same
    tokens as torch (the routes agree and so do the logits)."""
    from seqdeploy.export import export_onnx

    arch = registry.architecture("moe")
    config = {**arch.config("tiny"), "capacity_factor": 0.5}
    torch.manual_seed(0)
    model = arch.build(config).eval()
    proto, summary = export_onnx(arch, config, model, "fp32", registry)
    factors = [a.f for n in proto.graph.node if n.op_type == "Top1Router"
               for a in n.attribute if a.name == "capacity_factor"]
    assert factors == [0.5] * config["n_layers"]
    assert summary["control_flow"] == 0
    inputs = arch.make_inputs(config, 2, 40, seed=1)
    with torch.no_grad():
        logits, routes = model(*inputs.values())
        model.moes[0].capacity_factor = 0.0
        open_logits, _ = model(*inputs.values())
    assert float((open_logits - logits).norm() / logits.norm()) > 1e-3, "nothing was dropped"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out_logits, out_routes = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert torch.equal(torch.from_numpy(out_routes), routes)
    assert float((torch.from_numpy(out_logits) - logits).norm() / logits.norm()) < 1e-5


@pytest.mark.parametrize("capacity_factor, masked", [(0.0, False), (0.0, True), (1.0, True)])
def test_fused_projection_and_route_match_the_two_steps(monkeypatch, capacity_factor, masked):
    """Where eager CUDA inference would take the one-launch projection and route (simulated
    here: the router module sees "cuda", the kernel runs in the interpreter), the block gives
    the experts and outputs of the two-step path; under ``reference_ops`` it takes the
    separate ops (the router's reference), not the fused launch."""
    import seqdeploy_moe.router as router

    torch.manual_seed(0)
    block = MoEFeedForward(32, 64, 4, capacity_factor=capacity_factor).eval().to(torch.bfloat16)
    block.router.float()
    x = torch.randn(2, 9, 32).to(torch.bfloat16)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    mask = mask if masked else None
    fused = []
    kernel = router._triton_router_logits

    def spy(*args, **kwargs):
        fused.append(bool(kwargs.get("route")))
        return kernel(*args, **kwargs)

    with torch.no_grad():
        want_y, want_e = block(x, mask=mask)
        monkeypatch.setattr(router, "eager_device", lambda *tensors: "cuda")
        monkeypatch.setattr(router, "_triton_router_logits", spy)
        got_y, got_e = block(x, mask=mask)
        assert fused == [True]
        assert torch.equal(got_e, want_e)
        assert float((got_y.float() - want_y.float()).norm() / want_y.float().norm()) < 1e-2
        fused.clear()
        with reference_ops():
            block(x, mask=mask)
        assert True not in fused
