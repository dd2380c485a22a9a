"""The Temporal Eigenstate Network: embedding, L x (eigen mixer, FFN), final norm, tied head.

Shapes: ``input_ids [B, T] int64``, state ``h_re, h_im [B, L, K]`` in and out (streaming),
``logits [B, T, V]``; with the moe plugin's Switch FFN (config ``"ffn": {"kind": "moe", ...}``)
also ``routes [B, T, L] int64``, each layer's expert per token. Norm statistics (and the MoE
router) are computed in fp32 whatever the weights' dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqdeploy_ten.ops import EIGEN_SCAN


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are fp32 (the fp32 island of the FP16 policy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class EigenMixer(nn.Module):
    """Pre-norm mixer: ``x + ([c'_re | c'_im] W_out) * sigmoid(u W_g + b_g)`` with
    ``c = EigenScan(gamma * u W_in)`` and the resonance readout ``c' = c (I + M)``."""

    def __init__(self, d_model: int, k: int):
        super().__init__()
        self.k = k
        self.norm = LayerNorm32(d_model)
        self.w_in = nn.Linear(d_model, 2 * k, bias=False)
        magnitude = torch.empty(k).uniform_(0.9, 0.999)
        self.nu = nn.Parameter(torch.log(-torch.log(magnitude)))
        self.theta = nn.Parameter(torch.empty(k).uniform_(0.0, math.pi))
        self.coupling = nn.Parameter(torch.randn(k, k) * 1e-3)   # M, near 0
        self.w_out = nn.Linear(2 * k, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_model)

    def forward(self, x, h_re, h_im):
        u = self.norm(x)
        p = self.w_in(u)
        # gamma_k = sqrt(1 - |lam_k|^2), fp32 from the fp32 nu
        gamma = torch.sqrt(-torch.expm1(-2.0 * torch.exp(self.nu.float()))).to(p.dtype)
        x_re, x_im = p[..., :self.k] * gamma, p[..., self.k:] * gamma
        c_re, c_im = EIGEN_SCAN(x_re, x_im, self.nu, self.theta, h_re, h_im)
        m = self.coupling.to(c_re.dtype)
        mixed = torch.cat([c_re + c_re @ m, c_im + c_im @ m], dim=-1)
        y = self.w_out(mixed) * torch.sigmoid(self.gate(u))
        return x + y, c_re[:, -1], c_im[:, -1]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int = 4):
        super().__init__()
        self.norm = LayerNorm32(d_model)
        self.up = nn.Linear(d_model, mult * d_model)
        self.down = nn.Linear(mult * d_model, d_model)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def make_ffn(d_model: int, ffn: dict | None) -> nn.Module:
    """The FFN of each layer: GELU 4x by default, or the ``moe`` plugin's Switch block
    ``MoEFeedForward`` (``{"kind": "moe", "n_experts": E, "d_ff": f, "capacity_factor": cf}``)."""
    if not ffn:
        return FeedForward(d_model)
    from seqdeploy_moe.model import is_moe_ffn, moe_ffn_from_config

    return moe_ffn_from_config(d_model, ffn) if is_moe_ffn(ffn) else FeedForward(d_model)


class TenModel(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, k: int, ffn: dict | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mixers = nn.ModuleList(EigenMixer(d_model, k) for _ in range(n_layers))
        self.ffns = nn.ModuleList(make_ffn(d_model, ffn) for _ in range(n_layers))
        self.routed = not isinstance(self.ffns[0], FeedForward)   # MoE: also returns routes
        self.norm = LayerNorm32(d_model)

    def forward(self, input_ids, h_re, h_im):
        x = self.embed(input_ids)
        states_re, states_im, routes = [], [], []
        for i, (mixer, ffn) in enumerate(zip(self.mixers, self.ffns)):
            # the state crosses the graph boundary in fp32 (DESIGN.md, precision policy)
            x, s_re, s_im = mixer(x, h_re[:, i].to(x.dtype), h_im[:, i].to(x.dtype))
            if self.routed:
                x, expert = ffn(x)
                routes.append(expert)
            else:
                x = ffn(x)
            states_re.append(s_re)
            states_im.append(s_im)
        logits = F.linear(self.norm(x), self.embed.weight)   # tied head
        out = (logits, torch.stack(states_re, 1).float(), torch.stack(states_im, 1).float())
        return (*out, torch.stack(routes, -1)) if self.routed else out
