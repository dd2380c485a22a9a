"""seqdeploy plugin ``moe``: Switch-Transformer top-1 mixture of experts (ARCHITECTURES.md
section 5).

Ops: ``top1_router`` (``router.py``) and ``moe_experts`` (``experts.py``), their Triton kernels
(``kernels.py``) and ONNX forms (``onnx.py``); the model and the reusable ``MoEFeedForward``
block are in ``model.py``. The model has no recurrent state: it does not stream.
"""
from __future__ import annotations

from typing import Any

import torch

from seqdeploy.architecture import BATCH, INDEX, SEQ, Architecture, ParityLimits, TensorSpec
from seqdeploy.bench import OpBenchmark
from seqdeploy.hookspecs import hookimpl


class MoE(Architecture):
    name = "moe"
    description = "Switch Transformer encoder: top-1 router + grouped-GEMM experts (Top1Router, MoEExperts)"
    presets = {
        "tiny": {"vocab": 256, "d_model": 32, "d_ff": 64, "n_experts": 4, "n_layers": 2,
                 "n_heads": 2, "capacity_factor": 0.0, "complexity": True, "seq_len": 128,
                 "bench_batch": 8},
        "base": {"vocab": 32000, "d_model": 768, "d_ff": 3072, "n_experts": 8, "n_layers": 4,
                 "n_heads": 12, "capacity_factor": 0.0, "complexity": False, "seq_len": 1024,
                 "bench_batch": 8},
        "base64": {"vocab": 32000, "d_model": 768, "d_ff": 3072, "n_experts": 64, "n_layers": 4,
                   "n_heads": 12, "capacity_factor": 0.0, "complexity": False, "seq_len": 1024,
                   "bench_batch": 8},
    }
    ops = ("top1_router", "moe_experts")
    state_map: dict[str, str] = {}
    fp32_parameters = ("router",)
    gpu_preset = "base"

    def build(self, config: dict[str, Any]) -> torch.nn.Module:
        from seqdeploy_moe.model import SwitchEncoder

        return SwitchEncoder(config["vocab"], config["d_model"], config["d_ff"], config["n_experts"],
                             config["n_layers"], config["n_heads"], config["capacity_factor"],
                             complexity=config["complexity"])

    def input_specs(self, config):
        specs = [TensorSpec("input_ids", "int64", (BATCH, SEQ), "token ids", (0, config["vocab"]))]
        if config["complexity"]:
            specs.append(TensorSpec("c", "float32", (BATCH, SEQ),
                                    "per-token complexity in [0, 1], added to the router logits"))
        return specs

    def output_specs(self, config):
        return [TensorSpec("logits", "float", (BATCH, SEQ, config["vocab"]), "next-token logits",
                           depends_on="routes"),
                TensorSpec("routes", "int64", (BATCH, SEQ, config["n_layers"]),
                           "expert chosen per token and layer", kind=INDEX)]

    def parity_limits(self, precision, config):
        limits = super().parity_limits(precision, config)
        # A near-tie between two experts' logits may flip wherever the arithmetic differs
        # (fp16 most of all); a flipped token routes through another expert, which is a
        # legitimate result. Logits are compared at the tokens whose routes agree in every
        # layer (core v2: depends_on).
        from seqdeploy_moe.model import ROUTE_AGREEMENT

        return {"routes": ParityLimits(rel_l2=0.0, min_agreement=ROUTE_AGREEMENT[precision]),
                "logits": limits}

    def make_inputs(self, config, batch, seq_len, seed=0):
        g = torch.Generator().manual_seed(seed)
        inputs = {"input_ids": torch.randint(0, config["vocab"], (batch, seq_len), generator=g)}
        if config["complexity"]:
            inputs["c"] = torch.rand(batch, seq_len, generator=g)
        return inputs

    def op_benchmarks(self, config, batch, seq_len, dtype, device):
        from seqdeploy_moe.model import MOE_EXPERTS, TOP1_ROUTER

        d, f, E = config["d_model"], config["d_ff"], config["n_experts"]
        g = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(batch, seq_len, d, generator=g, device=device, dtype=dtype)
        logits = torch.randn(batch, seq_len, E, generator=g, device=device)
        expert, gate = TOP1_ROUTER.torch_op(logits, 0.0)
        w1 = torch.randn(E, d, f, generator=g, device=device, dtype=dtype) * d ** -0.5
        w2 = torch.randn(E, f, d, generator=g, device=device, dtype=dtype) * f ** -0.5
        b1 = torch.zeros(E, f, device=device, dtype=dtype)
        b2 = torch.zeros(E, d, device=device, dtype=dtype)
        n = batch * seq_len
        size = torch.finfo(dtype).bits // 8
        label = f"B={batch} T={seq_len} d={d} f={f} E={E} {str(dtype)[6:]}"
        return [
            OpBenchmark("top1_router", lambda: TOP1_ROUTER.torch_op(logits, 0.0),
                        logits.numel() * 4 + n * 12, f"B={batch} T={seq_len} E={E}"),
            OpBenchmark("moe_experts",
                        lambda: MOE_EXPERTS.torch_op(x, expert, gate, w1, b1, w2, b2),
                        2 * x.numel() * size + (w1.numel() + w2.numel()) * size, label),
        ]


@hookimpl
def register_architectures(register):
    register(MoE())


@hookimpl
def register_ops(register):
    from seqdeploy_moe.model import MOE_EXPERTS, TOP1_ROUTER

    register(TOP1_ROUTER)
    register(MOE_EXPERTS)
