"""top1_router and moe_experts: float64 naive loops vs every other form (step-loop reference,
vectorised CPU op, Triton kernels with NaN-poisoned outputs, ONNX fallback functions in plain
ONNX Runtime). Triton runs through its interpreter on CPU-only machines.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DEVICE, gpu, make_model
from onnx import TensorProto, helper

from seqdeploy.errors import InputError
from seqdeploy.ops import DOMAIN, plugin_attributes
from seqdeploy_moe.experts import (grouped_moe_experts, moe_experts, naive_moe_experts,
                                   reference_moe_experts)
from seqdeploy_moe.kernels import (EXPERTS_VARIANTS, ExpertsPlan, GemmTiles, bucket_tokens,
                                    experts_plan, group_tokens, triton_moe_experts,
                                    triton_top1_router)
from seqdeploy_moe.onnx import moe_experts_function, top1_router_function
from seqdeploy_moe.router import (naive_top1_router, reference_top1_router, top1_router,
                                  vectorised_top1_router)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max rel-L2 of y against the float64 loop on the same rounded inputs (h is rounded to the
# activation dtype between the layers, as a dense FFN in that dtype does)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def poisoned_route(B, T, device):
    return (torch.full((B, T), -7, dtype=torch.int64, device=device),
            torch.full((B, T), math.nan, dtype=torch.float32, device=device))


def router_forms():
    return {
        "reference": reference_top1_router,
        "vectorised": vectorised_top1_router,
        "op": top1_router,
        "triton": lambda lg, cf: triton_top1_router(lg.to(DEVICE), cf,
                                                    out=poisoned_route(*lg.shape[:2], DEVICE)),
    }


def assert_route(got, want):
    expert, gate = (t.cpu() for t in got)
    ref_e, ref_g = want
    assert expert.dtype == torch.int64 and gate.dtype == torch.float32
    assert torch.equal(expert, ref_e), f"{(expert != ref_e).sum()} choices differ"
    assert torch.isfinite(gate).all()
    assert (gate.double() - ref_g).abs().max() <= 1e-6     # fp32 exp and sum (GPU exp2 approx)
    assert torch.equal(gate == 0, ref_g == 0), "dropped tokens differ"


# -- router ----------------------------------------------------------------------------------
def test_naive_router_hand_case():
    """The oracle on a case worked by hand: E=2, T=5, cap = ceil(0.8 * 5 / 2) = 2."""
    logits = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [0.0, 3.0], [5.0, 1.0], [0.0, 0.0]]])
    expert, gate = naive_top1_router(logits, 0.8)
    assert expert.tolist() == [[0, 0, 1, 0, 0]]        # ties go to expert 0
    s = lambda d: 1.0 / (1.0 + math.exp(-d))  # noqa: E731   softmax of two logits
    assert torch.allclose(gate, torch.tensor([[s(1.0), 0.5, s(3.0), 0.0, 0.0]], dtype=torch.float64))
    _, open_gate = naive_top1_router(logits, 0.0)
    assert (open_gate > 0).all()


@pytest.mark.parametrize("E", [4, 7, 16, 64])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 37), (2, 130)])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 2.0])
def test_router_forms_match_naive(B, T, E, capacity_factor):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + E)
    logits = 2.0 * torch.randn(B, T, E, generator=g)
    logits[..., 1] += 1.0                                  # an over-subscribed expert
    want = naive_top1_router(logits, capacity_factor)
    if capacity_factor == 0.5 and T > 1:
        assert (want[1] == 0).any(), "the case must drop tokens"
    for name, form in router_forms().items():
        assert_route(form(logits, capacity_factor), want)


@pytest.mark.parametrize("E", [4, 64])
def test_router_ties_lowest_index_wins(E):
    """Integer logits from a small range: most rows tie; capacity on and off."""
    g = torch.Generator().manual_seed(E)
    logits = torch.randint(0, 3, (2, 50, E), generator=g).float()
    for cf in (0.0, 1.0):
        want = naive_top1_router(logits, cf)
        for form in router_forms().values():
            assert_route(form(logits, cf), want)


def test_router_capacity_rounding_is_exact():
    """cf * T / E integral in reals (1.1 * 40 / 4 = 11) while fp32(1.1) > 1.1: every form
    rounds cf * T to fp32 before dividing, so cap is 11 in all (float64 arithmetic on
    fp32(1.1) would give 12)."""
    logits = torch.zeros(1, 40, 4)
    logits[..., 2] = 1.0                                    # every token wants expert 2
    want = naive_top1_router(logits, 1.1)
    kept = int((want[1] > 0).sum())
    assert kept == 11 and math.ceil(float(np.float32(1.1)) * 40 / 4) == 12
    for form in router_forms().values():
        assert_route(form(logits, 1.1), want)
    assert_route(run_router_function(logits, 1.1), want)


def test_router_rejects_bad_logits():
    with pytest.raises(InputError, match="float32"):
        top1_router(torch.zeros(1, 2, 3, dtype=torch.float16), 0.0)
    with pytest.raises(InputError, match=r"\[B, T, E\]"):
        top1_router(torch.zeros(2, 3), 0.0)


def test_router_matches_transformers_switch_router():
    """Decisions equal transformers' SwitchTransformersTop1Router with capacity off (its
    expert_capacity = T drops nothing). Its return value changed across versions, so the
    choice is read from whichever output holds it: an index tensor or a one-hot mask (with a
    kept unit axis in transformers 5.17)."""
    st = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers",
                             reason="transformers is not installed")
    from transformers import SwitchTransformersConfig

    E, d, T = 8, 16, 64
    config = SwitchTransformersConfig(num_experts=E, d_model=d, expert_capacity=T,
                                      router_jitter_noise=0.0, router_dtype="float32",
                                      router_bias=False)
    router = st.SwitchTransformersTop1Router(config).eval()
    hidden = torch.randn(2, T, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = router(hidden)
        logits = torch.nn.functional.linear(hidden, router.classifier.weight.float())
    outs = outs if isinstance(outs, tuple) else (outs,)
    choice = None
    for t in outs:
        if not isinstance(t, torch.Tensor):
            continue
        if not t.is_floating_point() and t.numel() == 2 * T:
            choice = t.reshape(2, T).long()
        elif t.shape[-1] == E and t.numel() == 2 * T * E and bool(((t == 0) | (t == 1)).all()) \
                and bool((t.sum(-1) == 1).all()):   # one-hot: [B, T, E] or (5.x) [B, T, 1, E]
            choice = t.reshape(2, T, E).argmax(-1)
    assert choice is not None, f"no expert choice among the router's outputs {[type(o) for o in outs]}"
    expert, gate = top1_router(logits, 0.0)
    assert torch.equal(expert, choice)
    assert torch.allclose(gate, torch.softmax(logits, -1).max(-1).values, atol=1e-6)


# -- experts ---------------------------------------------------------------------------------
def make_experts(B, T, d, f, E, dtype, seed=0, route="random", dropped=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g)
    if route == "one":
        expert = torch.full((B, T), E - 1, dtype=torch.int64)
    else:
        expert = torch.randint(0, E, (B, T), generator=g)
        expert[expert == 1] = 0                            # expert 1 gets no tokens
    gate = torch.rand(B, T, generator=g) * 0.9 + 0.1
    gate.view(-1)[:dropped] = 0.0
    w1 = torch.randn(E, d, f, generator=g) * d ** -0.5
    b1 = 0.1 * torch.randn(E, f, generator=g)
    w2 = torch.randn(E, f, d, generator=g) * f ** -0.5
    b2 = 0.1 * torch.randn(E, d, generator=g)
    c = lambda t: t.to(dtype)  # noqa: E731
    return c(x), expert, gate, c(w1), c(b1), c(w2), c(b2)


def rel_l2(y, ref):
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "NaN/Inf in output (unwritten or overflowed)"
    return float((y - ref).norm() / ref.norm())


def triton_poisoned(*a, **kw):
    """``triton_moe_experts`` on DEVICE writing into a NaN-filled ``out``."""
    a = [t.to(DEVICE) for t in a]
    out = torch.full(a[0].shape, math.nan, dtype=a[0].dtype, device=DEVICE)
    return triton_moe_experts(*a, out=out, **kw)


def experts_forms():
    """Every form of the op; the Triton kernels once per named plan (``plan=`` variant)."""
    forms = {"reference": reference_moe_experts, "grouped": grouped_moe_experts,
             "op": moe_experts, "triton": triton_poisoned}
    for variant in EXPERTS_VARIANTS:
        forms[f"triton[{variant}]"] = (lambda *a, v=variant, **kw:
                                       triton_poisoned(*a, plan=v, **kw))
    return forms


SHAPES = [  # B, T, d, f, E, route, dropped
    (2, 29, 32, 64, 5, "random", 3),    # expert 1 empty, a few dropped tokens
    (1, 1, 16, 48, 4, "random", 0),     # one token
    (3, 17, 24, 40, 3, "one", 2),       # every token on the last expert, d and f not pow2
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,d,f,E,route,dropped", SHAPES)
def test_experts_forms_match_naive(B, T, d, f, E, route, dropped, dtype):
    args = make_experts(B, T, d, f, E, dtype, route=route, dropped=dropped)
    ref = naive_moe_experts(*args)
    for name, form in experts_forms().items():
        y = form(*args)
        assert y.dtype == dtype and y.shape == (B, T, d), name
        assert rel_l2(y, ref) < TOL[dtype], name
        flat = y.reshape(-1, d).cpu()
        assert (flat[:dropped] == 0).all(), f"{name}: dropped tokens must be exactly 0"


@pytest.mark.parametrize("design", ["padded", "padded-tma", "buckets", "auto"])
@pytest.mark.parametrize("block_m", [16, 32])
def test_triton_experts_many_tiles_per_group(block_m, design):
    """Groups spanning several row tiles and ending mid-tile (padding rows), in bf16; the
    ``block_m`` override keeps a plan's tail tiles only as deep as they stay >= 16 rows."""
    args = make_experts(2, 45, 32, 64, 3, torch.bfloat16, seed=4)
    y = triton_poisoned(*args, block_m=block_m, plan=design)
    assert rel_l2(y, naive_moe_experts(*args)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d, f, bn, bk, bm", [(32, 72, 128, 64, 16), (128, 192, 64, 32, 16),
                                             (256, 64, 32, 64, 64)])
def test_triton_experts_tma_form(dtype, d, f, bn, bk, bm):
    """The tensor-descriptor form against float64, with an empty expert and dropped tokens:
    (32, 72) a weight tile running past N (72 columns in 128-wide tiles: the descriptor reads
    zeros there) and K = 72 no multiple of the K tile (that layer takes the pointer kernel);
    (128, 192) and (256, 64) several K steps and several column blocks in both layers, so a
    tile read at the wrong K offset, column block or expert shows."""
    t = GemmTiles(bn, bk, 4, 2)
    plan = ExpertsPlan("padded", bm, t, t, tma=True)
    args = make_experts(2, 37, d, f, 4, dtype, seed=6, dropped=3)
    y = triton_poisoned(*args, plan=plan)
    assert rel_l2(y, naive_moe_experts(*args)) < TOL[dtype]
    assert (y.reshape(-1, d)[:3].cpu() == 0).all()


def test_triton_experts_auto_twice():
    """The default plan where it has a descriptor form (bf16, 64-row tiles): the first eager
    call of a signature runs that form, later ones the pointer form; both agree with
    float64."""
    args = make_experts(2, 64, 64, 96, 2, torch.bfloat16, seed=8, dropped=2)
    assert experts_plan(128, 2, 64, 96, torch.bfloat16).tma
    ref = naive_moe_experts(*args)
    for _ in range(2):
        assert rel_l2(triton_poisoned(*args), ref) < TOL[torch.bfloat16]


def bucket_plans():
    """Plans of the buckets design around the named ones: every tail depth and order, a
    persistent grid smaller than the work (in the interpreter: 4 "SMs", so each program
    strides over several items), tiles of different widths per layer."""
    t = GemmTiles(32, 16, 4, 2)
    plans = [ExpertsPlan("buckets", 64, t, t, order=order, tail=tail, persistent=pers)
             for order in ("m", "n") for tail in (0, 1, 2) for pers in (0, 1)]
    plans.append(ExpertsPlan("buckets", 32, GemmTiles(64, 32, 4, 2), GemmTiles(16, 64, 4, 2),
                             order="n", tail=1, persistent=2))
    return plans


@pytest.mark.parametrize("plan", bucket_plans(), ids=lambda p: p.name().replace(" ", "_"))
def test_triton_bucket_plans(plan):
    """Every combination of the buckets options, at group sizes that end in full, half and
    quarter tiles of block_m 64 (K and N not multiples of the tiles), fp32 and bf16, with
    an empty expert, dropped tokens and one expert taking most tokens."""
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        args = list(make_experts(3, 50, 40, 72, 6, dtype, seed=5, dropped=4))
        expert = torch.randint(0, 6, (3, 50), generator=g)
        expert[expert == 1] = 0                              # expert 1 empty
        expert[expert == 2] = 0
        expert.view(-1)[:5] = 2                              # 5 tokens: a quarter tile
        expert[2, 10:30] = 3                                 # a half tile or more
        args[1] = expert
        counts = torch.bincount(expert.view(-1), minlength=6)
        assert counts[1] == 0 and counts[2] == 5 and counts[0] > 64
        y = triton_poisoned(*args, plan=plan)
        assert rel_l2(y, naive_moe_experts(*args)) < TOL[dtype], dtype
        assert (y.reshape(-1, 40)[:4].cpu() == 0).all()


def test_experts_plans_are_checked():
    x, expert, gate, w1, b1, w2, b2 = make_experts(1, 4, 16, 32, 2, torch.float32)
    t = GemmTiles(32, 16, 4, 2)
    for plan, match in ((ExpertsPlan("buckets", 32, t, t, tail=2), "must be >= 16"),
                        (ExpertsPlan("padded", 32, t, t, order="n"), "padded design"),
                        (ExpertsPlan("buckets", 32, t, t, tma=True), "padded design only"),
                        (ExpertsPlan("rows", 32, t, t), "unknown experts plan")):
        with pytest.raises(ValueError, match=match):
            triton_moe_experts(x, expert, gate, w1, b1, w2, b2, plan=plan)
    with pytest.raises(ValueError, match="unknown experts variant"):
        triton_moe_experts(x, expert, gate, w1, b1, w2, b2, plan="fastest")
    for variant in EXPERTS_VARIANTS:     # every named plan is valid at the benchmark's shapes
        for E in (8, 64):
            for dtype in DTYPES:
                plan = experts_plan(8192, E, 768, 3072, dtype, variant)
                assert plan.block_m >> plan.tail >= 16, plan


@pytest.mark.parametrize("route", ["random", "one"])
def test_bucket_tokens(route):
    """counts is the histogram; row e of slot_token holds exactly expert e's tokens in its
    first counts[e] slots; an id out of range joins no bucket."""
    E, N = 5, 300
    g = torch.Generator().manual_seed(7)
    expert = torch.randint(0, E, (N,), generator=g) if route == "random" else torch.full((N,), 3)
    expert[expert == 1] = 0
    expert[7] = E                                           # out of range: in no bucket
    counts, slot_token = (t.cpu() for t in bucket_tokens(expert.to(DEVICE), E))
    valid = expert < E
    assert torch.equal(counts.long(), torch.bincount(expert[valid], minlength=E))
    for e in range(E):
        got = slot_token[e, :int(counts[e])].long().sort().values
        assert torch.equal(got, torch.nonzero(expert == e)[:, 0]), e


@pytest.mark.parametrize("E, N", [(5, 70), (40, 300)])
@pytest.mark.parametrize("route", ["random", "one"])
def test_group_tokens_layout(route, E, N):
    """Every token sits in exactly one row; each used tile holds one expert's tokens only,
    groups start on tile boundaries, padding rows are -1, unused tiles say E. (40, 300): more
    tiles than the layout kernel's programs cover in one step each, so the tile blocks stride."""
    bm = 16
    g = torch.Generator().manual_seed(3)
    expert = torch.randint(0, E, (N,), generator=g) if route == "random" else torch.full((N,), 2)
    expert[expert == 1] = 0                                 # an empty group
    row_token, tile_expert = (t.cpu() for t in group_tokens(expert.to(DEVICE), E, bm))
    counts = torch.bincount(expert, minlength=E)
    used = int(((counts + bm - 1) // bm).sum())
    assert tile_expert.numel() == -(-N // bm) + E
    assert (tile_expert[used:] == E).all() and (tile_expert[:used] < E).all()
    assert (tile_expert[:used].diff() >= 0).all()           # groups in expert order
    rows = row_token[:used * bm].reshape(used, bm)
    seen = rows[rows >= 0]
    assert torch.equal(seen.sort().values, torch.arange(N, dtype=torch.int32))
    for j in range(used):
        tokens = rows[j][rows[j] >= 0].long()
        assert len(tokens) and (expert[tokens] == tile_expert[j]).all()
        assert (rows[j][len(tokens):] == -1).all()          # padding only at the group's end
    for e in range(E):
        assert int((tile_expert == e).sum()) == -(-int(counts[e]) // bm)


def test_dropped_tokens_are_zero_even_if_the_ffn_overflows():
    x, expert, gate, w1, b1, w2, b2 = make_experts(1, 8, 16, 32, 2, torch.float16, dropped=8)
    w2 = w2 * 1e4                                           # the FFN overflows fp16
    for name, form in experts_forms().items():
        y = form(x, expert, gate, w1, b1, w2, b2)
        assert (y == 0).all(), name


def test_experts_reject_bad_input():
    x, expert, gate, w1, b1, w2, b2 = make_experts(1, 4, 16, 32, 2, torch.float32)
    with pytest.raises(InputError, match=r"expert ids must lie in \[0, 2\)"):
        moe_experts(x, expert + 5, gate, w1, b1, w2, b2)
    with pytest.raises(InputError, match="w2 must be"):
        moe_experts(x, expert, gate, w1, b1, w2[:, :-1], b2)


def test_fake_tensor_and_export_see_one_opaque_op_each():
    x, expert, gate, w1, b1, w2, b2 = make_experts(2, 9, 16, 32, 3, torch.float32)
    logits = torch.randn(2, 9, 3)

    class Wrap(torch.nn.Module):
        def forward(self, logits, x, w1, b1, w2, b2):
            e, g = top1_router(logits, 1.5)
            return moe_experts(x, e, g, w1, b1, w2, b2), e

    program = torch.export.export(Wrap(), (logits, x, w1, b1, w2, b2))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if "seqdeploy" in t] == ["seqdeploy.top1_router.default",
                                                        "seqdeploy.moe_experts.default"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        e, g = top1_router(mode.from_tensor(logits), 0.0)
        assert e.shape == (2, 9) and e.dtype == torch.int64 and g.dtype == torch.float32


# -- ONNX fallback functions in plain ONNX Runtime -------------------------------------------
def _run_function(function, inputs: dict, outputs: list[tuple[str, int]], attrs=None):
    names = list(inputs)
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            np.dtype(np.int64): TensorProto.INT64}
    node = helper.make_node(function.name, names, [o for o, _, _ in outputs], domain=DOMAIN,
                            **plugin_attributes(), **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, elem[v.dtype], v.shape) for n, v in inputs.items()],
        [helper.make_tensor_value_info(o, t, [None] * rank) for o, t, rank in outputs])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              functions=[function])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def run_router_function(logits, capacity_factor):
    expert, gate = _run_function(top1_router_function(20), {"logits": logits.numpy()},
                                 [("expert", TensorProto.INT64, 2), ("gate", TensorProto.FLOAT, 2)],
                                 {"capacity_factor": capacity_factor})
    return torch.from_numpy(expert), torch.from_numpy(gate)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.25])
def test_router_function_in_onnxruntime(capacity_factor):
    g = torch.Generator().manual_seed(11)
    logits = torch.cat([torch.randn(2, 33, 6, generator=g),
                        torch.randint(0, 2, (2, 7, 6), generator=g).float()], dim=1)   # ties
    assert_route(run_router_function(logits, capacity_factor), naive_top1_router(logits, capacity_factor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_experts_function_in_onnxruntime(dtype):
    args = make_experts(2, 13, 16, 24, 4, dtype, seed=2, dropped=2)
    names = ("x", "expert", "gate", "w1", "b1", "w2", "b2")
    (y,) = _run_function(moe_experts_function(20), {n: a.numpy() for n, a in zip(names, args)},
                         [("y", TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16, 3)])
    y = torch.from_numpy(y)
    assert rel_l2(y, naive_moe_experts(*args)) < TOL[dtype]
    assert (y.reshape(-1, 16)[:2] == 0).all()


# -- GPU -------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [8, 64])
def test_cuda_ops_at_benchmark_shape(E, dtype):
    """The registered ops on CUDA (Triton) at d=768, f=3072 over 2048 tokens, against the
    float64 loop on a sample of tokens (every token of expert 0, and the first 64 tokens)."""
    g = torch.Generator().manual_seed(E)
    B, T, d, f = 2, 1024, 768, 3072
    logits = torch.randn(B, T, E, generator=g)
    expert, gate = top1_router(logits.cuda(), 1.0)
    assert_route((expert, gate), naive_top1_router(logits, 1.0))
    x, _, _, w1, b1, w2, b2 = make_experts(B, T, d, f, E, dtype, seed=E)
    args = [t.cuda() for t in (x, expert.cpu(), gate.cpu(), w1, b1, w2, b2)]
    y = moe_experts(*args).cpu()
    pick = torch.zeros(B, T, dtype=torch.bool)
    pick[0, :64] = True
    pick |= expert.cpu() == 0
    sub = [x[pick][None], expert.cpu()[pick][None], gate.cpu()[pick][None], w1, b1, w2, b2]
    ref = naive_moe_experts(*sub)
    assert rel_l2(y[pick][None], ref) < TOL[dtype]


def test_torch_compile_keeps_both_ops_whole():
    from conftest import compile_and_trace

    x, expert, gate, w1, b1, w2, b2 = make_experts(2, 11, 16, 32, 3, torch.float32)
    logits = torch.randn(2, 11, 3)

    def layer(logits, x, w1, b1, w2, b2):
        e, g = top1_router(logits, 1.0)
        return moe_experts(x, e, g, w1, b1, w2, b2)

    out, seen = compile_and_trace(layer, logits, x, w1, b1, w2, b2)
    assert "seqdeploy.top1_router.default" in seen and "seqdeploy.moe_experts.default" in seen
    e, g = naive_top1_router(logits, 1.0)
    assert rel_l2(out, naive_moe_experts(x, e, g, w1, b1, w2, b2)) < TOL[torch.float32]


def test_router_nan_rows_keep_valid_ids():
    """A NaN row (an overflow upstream) still names an expert in [0, E): the experts never
    index out of bounds, and the NaN gate propagates to that token's output."""
    logits = torch.randn(1, 6, 5)
    logits[0, 2] = math.nan
    for name, form in router_forms().items():
        expert, gate = (t.cpu() for t in form(logits, 0.0))
        assert ((expert >= 0) & (expert < 5)).all(), name
        assert torch.isfinite(gate[0, [0, 1, 3, 4, 5]]).all(), name


def test_layer_benchmark_smoke_run(tmp_path, capsys):
    """benchmarks/moe_layer.py runs on one unattended device call: its --smoke run takes
    every path once on the CPU (the interpreter) and reports each plan's error."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the smoke run takes the Triton kernels through the interpreter (CPU only)")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "moe_layer.py"
    spec = importlib.util.spec_from_file_location("moe_layer_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "moe.json"
    assert bench.main(["--smoke", "--tokens", "40", "--d", "16", "--f", "32", "--experts", "3",
                       "--block-m", "16", "--variants", "padded", "buckets-tail",
                       "--json", str(out)]) == 0
    assert "buckets-tail" in capsys.readouterr().out
    plans = json.loads(out.read_text())["points"][0]["plans"]
    assert set(plans) == {"padded", "buckets-tail"}
    assert all(p["rel_l2"] < TOL[torch.bfloat16] for p in plans.values()), plans


# -- router projection -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, d, E", [(1, 16, 4), (37, 80, 8), (70, 200, 64), (33, 64, 130)])
@pytest.mark.parametrize("split", [False, True], ids=["tf32x3", "split"])
def test_router_logits_kernel_against_float64(N, d, E, dtype, split):
    """The projection kernel (NaN-poisoned output) at odd row counts, a K tail and E not a
    power of two, against the float64 product of the same rounded inputs: each entry within
    2^-18 of the sum of |products| (fp32 accumulation of tf32x3 products), and the same
    argmax as the float64 logits wherever the top two are apart by more than that."""
    from seqdeploy_moe.kernels import projection_tiles, triton_router_logits

    g = torch.Generator().manual_seed(N + E)
    u = torch.randn(N, d, generator=g).to(dtype)
    w = torch.randn(E, d, generator=g) * d ** -0.5
    exact = u.double() @ w.double().T
    scale = u.double().abs() @ w.double().abs().T
    out = torch.full((N, E), math.nan, device=DEVICE)
    tiles = dataclasses.replace(projection_tiles(E), split=split)
    got = triton_router_logits(u.to(DEVICE), w.to(DEVICE), out=out, tiles=tiles).double().cpu()
    assert torch.isfinite(got).all(), "an entry was left unwritten"
    assert ((got - exact).abs() <= 2.0 ** -18 * scale).all()
    top2 = exact.topk(min(2, E), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 2.0 ** -16 * scale.max(-1).values
    assert torch.equal(got.argmax(-1)[clear], exact.argmax(-1)[clear])


@pytest.mark.parametrize("E", [4, 64, 130])
def test_projection_kernel_routes_as_the_router_does(E):
    """``route=True``: expert equals the router kernel's on the logits the same launch returns
    and gate agrees to rounding, with exact ties (lowest index wins), a NaN row and rows past
    a whole tile; the logits equal those of the launch without routing."""
    from seqdeploy_moe.kernels import triton_router_logits, triton_top1_router

    g = torch.Generator().manual_seed(E)
    u = torch.randn(2, 45, 48, generator=g).to(torch.bfloat16)
    u[0, 3] = 0.0                                    # every logit 0: a tie across all experts
    u[1, 7, 5] = math.nan                            # a NaN row
    w = torch.randn(E, 48, generator=g) * 48 ** -0.5
    w[1] = w[0]                                      # experts 0 and 1 tie on every token
    u, w = u.to(DEVICE), w.to(DEVICE)
    out = torch.full((90, E), math.nan, device=DEVICE)
    logits, expert, gate = triton_router_logits(u, w, out=out, route=True)
    want_e, want_g = triton_top1_router(logits, 0.0)
    torch.testing.assert_close(logits, triton_router_logits(u, w), rtol=0, atol=0,
                               equal_nan=True)
    assert torch.equal(expert, want_e)
    # the same sum of exponentials, added in the order of another tile layout
    torch.testing.assert_close(gate, want_g, rtol=4e-7, atol=0, equal_nan=True)
    assert gate[1, 7].isnan() and not gate[1, 6].isnan()
    assert int(expert[0, 3]) == 0 and (expert != 1).all()


def test_router_logits_keeps_the_fp32_form_off_eager_cuda():
    """Off CUDA, for fp32 inputs and when a gradient is needed, ``router_logits`` is exactly
    ``F.linear`` in fp32 (the form the exported graph holds)."""
    from seqdeploy_moe.router import router_logits

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        u = torch.randn(2, 5, 24, generator=g).to(dtype)
        w = torch.randn(6, 24, generator=g, requires_grad=dtype == torch.float32)
        want = torch.nn.functional.linear(u.float(), w.float())
        got = router_logits(u, w)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_router_logits_on_cuda_takes_the_kernel_and_agrees(dtype):
    """On CUDA, eager, half inputs: ``router_logits`` runs the kernel (its result differs
    from the fp32 GEMM's in rounding only) and routes 8192 tokens over 64 experts as the
    fp32 GEMM does except at near-ties."""
    from seqdeploy_moe.router import router_logits

    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(8192, 768, device="cuda", generator=g).to(dtype)
    w = torch.randn(64, 768, device="cuda", generator=g) * 768 ** -0.5
    exact = u.double() @ w.double().T
    scale = u.double().abs() @ w.double().abs().T
    got = router_logits(u, w).double()
    assert ((got - exact).abs() <= 2.0 ** -18 * scale).all()
    fp32 = torch.nn.functional.linear(u.float(), w).double()
    assert (got.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.999
