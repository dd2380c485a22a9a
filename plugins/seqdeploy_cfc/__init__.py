"""seqdeploy plugin ``cfc``: liquid network, closed-form continuous-time cell
(ARCHITECTURES.md section 2)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seqdeploy.architecture import BATCH, SEQ, Architecture, TensorSpec
from seqdeploy.bench import OpBenchmark
from seqdeploy.hookspecs import hookimpl

#: the seed's benchmark points (B, T) per hidden size H
SEED_POINTS = {256: [(32, 10), (64, 50), (128, 100)], 512: [(256, 50)]}


class CfC(Architecture):
    name = "cfc"
    description = "Liquid network: closed-form continuous-time cell, nonlinear recurrence (CfCScan)"
    presets = {
        "tiny": {"in_features": 8, "hidden": 16, "n_layers": 2, "out_features": 8, "dt": 1.0,
                 "seq_len": 64, "bench_batch": 8},
        "seed": {"in_features": 64, "hidden": 256, "n_layers": 1, "out_features": 64, "dt": 1.0,
                 "seq_len": 100},
        "seed512": {"in_features": 64, "hidden": 512, "n_layers": 1, "out_features": 64,
                    "dt": 1.0, "seq_len": 50},
    }
    ops = ("cfc_scan",)
    state_map = {"h": "h_out"}
    fp32_parameters = ("rho",)
    gpu_preset = "seed"
    cpu_preset = "tiny"

    def build(self, config: dict[str, Any]) -> torch.nn.Module:
        from seqdeploy_cfc.model import CfCModel

        return CfCModel(config["in_features"], config["hidden"], config["n_layers"],
                        config["out_features"], config.get("dt", 1.0))

    def bench_shapes(self, config):
        return SEED_POINTS.get(config["hidden"]) or super().bench_shapes(config)

    def input_specs(self, config):
        state = (BATCH, config["n_layers"], config["hidden"])
        return [TensorSpec("x", "float", (BATCH, SEQ, config["in_features"]), "input features"),
                TensorSpec("h", "float32", state, "initial state per layer")]

    def output_specs(self, config):
        state = (BATCH, config["n_layers"], config["hidden"])
        return [TensorSpec("y", "float", (BATCH, SEQ, config["out_features"]), "per-step output"),
                TensorSpec("h_out", "float32", state, "final state per layer")]

    def make_inputs(self, config, batch, seq_len, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(batch, seq_len, config["in_features"], generator=g),
                "h": 0.5 * torch.randn(batch, config["n_layers"], config["hidden"], generator=g)}

    def op_benchmarks(self, config, batch, seq_len, dtype, device):
        from seqdeploy_cfc.model import CFC_SCAN

        hidden, dt = config["hidden"], float(config.get("dt", 1.0))
        g = torch.Generator(device=device).manual_seed(3)
        xw = torch.randn(batch, seq_len, hidden, generator=g, device=device).to(dtype)
        h0 = torch.zeros(batch, hidden, device=device, dtype=dtype)
        w_rec = (torch.randn(hidden, hidden, generator=g, device=device) * hidden ** -0.5).to(dtype)
        tau = F.softplus(torch.randn(hidden, generator=g, device=device)) + 0.01
        size = xw.element_size()
        # xw read once, y written once, w_rec, h0 and tau read once
        moved = 2 * xw.numel() * size + (w_rec.numel() + h0.numel()) * size + 4 * hidden
        return [OpBenchmark("cfc_scan", lambda: CFC_SCAN.torch_op(xw, h0, w_rec, tau, dt),
                            moved, f"B={batch} T={seq_len} H={hidden} {str(dtype)[6:]}")]


@hookimpl
def register_architectures(register):
    register(CfC())


@hookimpl
def register_ops(register):
    from seqdeploy_cfc.model import CFC_SCAN

    register(CFC_SCAN)
