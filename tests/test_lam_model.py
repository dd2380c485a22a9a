"""The lam encoder: padding is harmless, split and step-at-a-time equal the full run, the kernel
model equals the reference model, and the exported ONNX (one DualDeltaRule node per layer)
runs in plain onnxruntime with a ragged mask."""
from __future__ import annotations

import os

import pytest
import torch

from seqdeploy.ops import reference_ops
from seqdeploy.plugins import load_registry

NAMES = ("token_states", "embedding", "memory_out", "conv_out")


@pytest.fixture(scope="module")
def lam():
    registry = load_registry()
    arch = registry.architecture("lam")
    config = arch.config("tiny")
    torch.manual_seed(0)
    return registry, arch, config, arch.build(config).eval()


def run(model, inputs, names=NAMES) -> dict[str, torch.Tensor]:
    """The model's outputs by name (``names``: a MoE preset adds ``routes``)."""
    with torch.no_grad():
        outs = model(inputs["input_ids"], inputs["attention_mask"], inputs["memory"],
                     inputs["conv"])
    assert len(outs) == len(names)
    return dict(zip(names, outs))


def close(a, b, tol=2e-5) -> bool:
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) < tol


def test_padding_changes_nothing(lam):
    """Right-padded rows of one batch equal each row run alone, trimmed to its length:
    token states at real positions, the embedding and both final states."""
    _, arch, config, model = lam
    inputs = arch.make_inputs(config, 4, 70, seed=1, ragged=True)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1
    batch = run(model, inputs)
    for i, length in enumerate(lengths):
        alone = run(model, {k: (v[i:i + 1, :length] if k in ("input_ids", "attention_mask")
                                else v[i:i + 1]) for k, v in inputs.items()})
        assert close(batch["token_states"][i:i + 1, :length], alone["token_states"]), i
        for name in NAMES[1:]:
            assert close(batch[name][i:i + 1], alone[name]), (i, name)


def test_left_padding_changes_nothing(lam):
    """From a zero state, left padding (masked tokens first) leaves every real output as is:
    the conv sees zeros there, as it does before the first token of the row alone."""
    _, arch, config, model = lam
    inputs = arch.make_inputs(config, 1, 30, seed=2)
    zero = {"memory": torch.zeros_like(inputs["memory"]), "conv": torch.zeros_like(inputs["conv"])}
    alone = run(model, {**inputs, **zero})
    pad = 9
    ids = torch.cat([torch.randint(0, config["vocab"], (1, pad)), inputs["input_ids"]], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.int64), inputs["attention_mask"]], 1)
    padded = run(model, {"input_ids": ids, "attention_mask": mask, **zero})
    assert close(padded["token_states"][:, pad:], alone["token_states"])
    for name in NAMES[1:]:
        assert close(padded[name], alone[name]), name


def test_masked_tokens_leave_the_state_alone(lam):
    """A call whose tokens are all masked returns its input state unchanged."""
    _, arch, config, model = lam
    inputs = arch.make_inputs(config, 2, 11, seed=3)
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    out = run(model, inputs)
    assert torch.equal(out["memory_out"], inputs["memory"])
    assert torch.equal(out["conv_out"], inputs["conv"])
    assert torch.equal(out["embedding"], torch.zeros_like(out["embedding"]))


def test_split_and_steps_equal_full(lam):
    _, arch, config, model = lam
    T = 24
    inputs = arch.make_inputs(config, 2, T, seed=4)
    full = run(model, inputs)
    for cuts in ([11], list(range(1, T))):
        state = {"memory": inputs["memory"], "conv": inputs["conv"]}
        pieces = []
        for a, b in zip([0, *cuts], [*cuts, T]):
            out = run(model, {"input_ids": inputs["input_ids"][:, a:b],
                              "attention_mask": inputs["attention_mask"][:, a:b], **state})
            pieces.append(out["token_states"])
            state = {"memory": out["memory_out"], "conv": out["conv_out"]}
        assert close(torch.cat(pieces, 1), full["token_states"]), len(cuts)
        assert close(state["memory"], full["memory_out"]) and close(state["conv"], full["conv_out"])


def test_kernel_model_equals_reference_model(lam):
    _, arch, config, model = lam
    inputs = arch.make_inputs(config, 3, 150, seed=5, ragged=True)
    fast = run(model, inputs)
    with reference_ops():
        slow = run(model, inputs)
    for name in NAMES:
        assert close(fast[name], slow[name]), name


def test_embedding_is_unit_length_and_decays_start_where_specified(lam):
    _, arch, config, model = lam
    out = run(model, arch.make_inputs(config, 3, 20, seed=6, ragged=True))
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(3), atol=1e-5)
    mixer = model.mixers[0]
    assert abs(torch.sigmoid(mixer.decay_fast.bias).mean().item() - 0.5) < 1e-6
    assert abs(torch.sigmoid(mixer.decay_slow.bias).mean().item() - 0.97) < 1e-6


def test_export_has_one_node_per_layer_and_runs_in_plain_onnxruntime(lam, precision="fp32"):
    """fp32, so the fallback function is held to 2e-5 (fp16 graphs: `seqdeploy run lam`)."""
    import onnxruntime as ort

    from seqdeploy.export import export_onnx

    registry, arch, config, model = lam
    proto, summary = export_onnx(arch, config, model, precision, registry)
    assert summary["custom_nodes"] == {"DualDeltaRule": config["n_layers"]}
    assert summary["control_flow"] == 0
    assert "seqdeploy.DualDeltaRule" in summary["functions"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = arch.make_inputs(config, 3, 45, seed=7, ragged=True)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = dict(zip(NAMES, (torch.from_numpy(x).float() for x in session.run(None, feeds))))
    ref = run(model, inputs)
    tol = 2e-5 if precision == "fp32" else 5e-3
    real = inputs["attention_mask"].bool()
    assert close(got["token_states"][real], ref["token_states"][real], tol)
    for name in NAMES[1:]:
        assert close(got[name], ref[name], tol), name


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SEQDEPLOY_LAM_E2E") == "0",
                    reason="SEQDEPLOY_LAM_E2E=0 (benchmarks/lam_gpu.sh runs `seqdeploy run lam` itself)")
def test_seqdeploy_run_lam_end_to_end_on_cpu(tmp_path):
    """``seqdeploy run lam`` on CPU: export (with the one-step graph), fp16, validate (ragged,
    split and step cases), bench, with the native ``ort`` engine (the library's DualDeltaRule
    kernel) and plain ONNX Runtime on the fallback function (``ort-onnx``)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "seqdeploy", "run", "lam", "--preset", "tiny",
                          "--device", "cpu", "--out", str(tmp_path), "--long-seq", "256",
                          "--no-plot"], capture_output=True, text=True, timeout=1500, env=env)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    assert "engine ort left out" not in out.stderr, out.stderr[-2000:]
    parity = json.loads((tmp_path / "lam" / "tiny" / "parity.json").read_text())
    assert parity["passed"]
    cases = {c["case"] for c in parity["checks"]}
    assert {"B3-T128-ragged", "B2-T128-split65", "B2-T48-steps", "B1-T256"} <= cases
    assert {(c["engine"], c["precision"]) for c in parity["checks"]} == \
        {(e, p) for e in ("torch", "ort", "ort-onnx") for p in ("fp32", "fp16")}
    assert not [c for c in parity["checks"] if c["output"] == "embedding" and "split" in c["case"]]
    bench = json.loads((tmp_path / "lam" / "tiny" / "bench.json").read_text())
    assert {r["engine"] for r in bench["engines"]} >= {"torch-ref", "torch"}
