"""D-LinOSS: input linear, L x damped-oscillator blocks, output linear per step
(ARCHITECTURES.md section 3).

Shapes: ``x [B, T, in]``, state ``[B, L, P, 4]`` fp32 in and out (per layer
``(z_re, z_im, x_re, x_im)`` of every oscillator; fp32 also in fp16 models, so a stream's
state is never rounded to fp16), ``y [B, T, out]``. The oscillator parameters ``A_raw``,
``G_raw``, ``dt_raw`` stay fp32 under the FP16 policy; norm statistics are fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqdeploy_dlinoss.ops import LINOSS_SCAN, stable_band


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are fp32 (the fp32 island of the FP16 policy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class LinossBlock(nn.Module):
    """``y = u + GLU(GELU(Re(C x) + D * v))`` with ``v = LN(u)`` and ``x = LinossScan(B v)``.

    ``B [P, H]`` and ``C [H, P]`` are complex, stored as real/imaginary pairs (``B`` as one
    ``[2P, H]`` projection whose halves feed the scan as strided views). ``dt = sigmoid(dt_raw)``,
    ``G = relu(G_raw)``, ``A = clamp(A_raw, A_lo, A_hi)`` are computed in fp32."""

    def __init__(self, hidden: int, p: int):
        super().__init__()
        self.p = p
        self.norm = LayerNorm32(hidden)
        self.b_proj = nn.Linear(hidden, 2 * p, bias=False)           # [B_re; B_im]
        nn.init.normal_(self.b_proj.weight, std=hidden ** -0.5)
        self.C_re = nn.Parameter(torch.randn(hidden, p) * (2 * p) ** -0.5)
        self.C_im = nn.Parameter(torch.randn(hidden, p) * (2 * p) ** -0.5)
        self.D = nn.Parameter(torch.randn(hidden))
        self.A_raw = nn.Parameter(torch.rand(p))
        self.G_raw = nn.Parameter(torch.rand(p))
        self.dt_raw = nn.Parameter(torch.empty(p).uniform_(-2.0, 0.0))
        self.glu = nn.Linear(hidden, 2 * hidden)

    def oscillators(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, G, dt), fp32 ``[P]``, A clamped into the stable band."""
        dt = torch.sigmoid(self.dt_raw.float())
        G = torch.relu(self.G_raw.float())
        lo, hi = stable_band(G, dt)
        return torch.clamp(self.A_raw.float(), lo, hi), G, dt

    def forward(self, u, state):
        v = self.norm(u)
        b = self.b_proj(v)
        A, G, dt = self.oscillators()
        x_re, x_im, state_out = LINOSS_SCAN(b[..., :self.p], b[..., self.p:], A, G, dt, state)
        y = F.linear(x_re, self.C_re.to(x_re.dtype)) - F.linear(x_im, self.C_im.to(x_re.dtype))
        y = F.gelu(y + self.D.to(y.dtype) * v)
        a, gate = self.glu(y).chunk(2, dim=-1)
        return u + a * torch.sigmoid(gate), state_out


class DLinossModel(nn.Module):
    def __init__(self, in_features: int, hidden: int, p: int, n_layers: int, out_features: int):
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(LinossBlock(hidden, p) for _ in range(n_layers))
        self.decoder = nn.Linear(hidden, out_features)

    def forward(self, x, state):
        u = self.encoder(x)
        states = []
        for i, block in enumerate(self.blocks):
            u, s = block(u, state[:, i])
            states.append(s)
        return self.decoder(u), torch.stack(states, 1)
