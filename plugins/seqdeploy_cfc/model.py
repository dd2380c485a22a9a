"""The liquid (CfC) network: L stacked CfC layers, then a per-step linear head.

Shapes: ``x [B, T, in]`` float, state ``h [B, L, H]`` in and out (streaming), output
``y [B, T, out]``. The time constants ``tau = softplus(rho) + 0.01`` are computed in fp32
whatever the weights' dtype (``rho`` stays fp32 under the FP16 policy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqdeploy_cfc.ops import cfc_scan_op

CFC_SCAN = cfc_scan_op()

TAU_FLOOR = 0.01
#: initial time constants are log-uniform in this range (in units of dt): short and long memory
TAU_INIT = (0.5, 20.0)


class CfCLayer(nn.Module):
    """``y = CfCScan(x W_in + b, h0, w_rec, tau, dt)``: the input GEMM is hoisted over all
    steps, so the op itself only carries the recurrent GEMM."""

    def __init__(self, in_features: int, hidden: int, dt: float = 1.0):
        super().__init__()
        self.dt = float(dt)
        self.w_in = nn.Linear(in_features, hidden)
        # spectral radius ~0.5 at init: contractive, so the state forgets rounding errors
        self.w_rec = nn.Parameter(torch.randn(hidden, hidden) * (0.5 / math.sqrt(hidden)))
        lo, hi = TAU_INIT
        tau = torch.exp(torch.empty(hidden).uniform_(math.log(lo), math.log(hi))) * self.dt
        self.rho = nn.Parameter(torch.log(torch.expm1(tau - TAU_FLOOR)))  # softplus^-1

    def tau(self) -> torch.Tensor:
        """``[H]`` fp32, > 0."""
        return F.softplus(self.rho.float()) + TAU_FLOOR

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, in]``, ``h0 [B, H]`` -> ``y [B, T, H]``, final state ``[B, H]``."""
        y = CFC_SCAN(self.w_in(x), h0, self.w_rec, self.tau(), self.dt)
        return y, y[:, -1]


class CfCModel(nn.Module):
    def __init__(self, in_features: int, hidden: int, n_layers: int, out_features: int,
                 dt: float = 1.0):
        super().__init__()
        widths = [in_features] + [hidden] * n_layers
        self.layers = nn.ModuleList(CfCLayer(widths[i], hidden, dt) for i in range(n_layers))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, in]``, ``h [B, L, H]`` -> ``y [B, T, out]``, ``h_out [B, L, H]``."""
        states = []
        for i, layer in enumerate(self.layers):
            # the state crosses the graph boundary in fp32 (DESIGN.md, precision policy)
            x, final = layer(x, h[:, i].to(x.dtype))
            states.append(final)
        return self.head(x), torch.stack(states, 1).float()
