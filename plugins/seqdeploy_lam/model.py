"""The LAM encoder: embedding, L x (dual-state delta-rule mixer, FFN), final norm, pooling.

Shapes: ``input_ids, attention_mask [B, T] int64`` (1 = real token), streaming state
``memory [B, L, n, 2, d, d]`` and ``conv [B, L, 3, 3D]`` (the last three pre-conv q|k|v
projections of each layer) in and out, fp32; outputs ``token_states [B, T, D]`` and
``embedding [B, D]`` (masked mean of the token states, L2-normalised); with the MoE FFN
(config ``"ffn": {"kind": "moe", ...}``) also ``routes [B, T, L] int64``, each layer's expert
per token.

Padding is harmless by construction: at a masked position the conv input is zeroed, beta = 0
and both log-decays are 0 (decay 1), so both memories pass through unchanged; the conv tail
handed on is gathered from the last three real positions; pooling counts real tokens only.
Exact for padding (masked tokens before the first or after the last real one); a masked token
between real ones feeds the conv a zero rather than being skipped. The MoE FFN runs no
expert for a masked token and counts only real tokens against an expert's capacity (with
``capacity_factor > 0`` the capacity is per call: a split or streamed run equals one call
only while no token is dropped; the presets drop none). Norm statistics, L2 normalisation,
the log-decays and the router are computed in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqdeploy_lam.ops import dual_delta_rule_op

DUAL_DELTA_RULE = dual_delta_rule_op()
CONV = 4          # causal depthwise conv width
FAST, SLOW = 0.5, 0.97   # initial per-token decays of the two memories


class RMSNorm32(nn.Module):
    """RMSNorm over the last axis with fp32 statistics (the fp32 island of the FP16 policy)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class DualDeltaMixer(nn.Module):
    """Pre-norm mixer ``x + W_o(RMSNorm(o) * SiLU(u W_gate))``, ``o = DualDeltaRule(...)``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n, self.d = n_heads, d_model // n_heads
        self.norm = RMSNorm32(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Parameter(torch.empty(3 * d_model, CONV).uniform_(-0.5, 0.5))
        self.beta = nn.Linear(d_model, n_heads)
        self.decay_fast = nn.Linear(d_model, n_heads)
        self.decay_slow = nn.Linear(d_model, n_heads)
        self.mix = nn.Linear(d_model, n_heads)
        for lin, bias in ((self.decay_fast, FAST), (self.decay_slow, SLOW)):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, math.log(bias / (1 - bias)))   # e^logsigmoid(b) = bias
        self.out_norm = RMSNorm32(self.d)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask, memory, conv_tail):
        """x [B,T,D]; mask [B,T] in x's dtype; memory [B,n,2,d,d] fp32; conv_tail [B,3,3D] fp32."""
        B, T, D = x.shape
        u = self.norm(x)
        p = self.qkv(u) * mask[..., None]              # masked positions feed the conv zeros
        ext = torch.cat([conv_tail.to(p.dtype), p], 1)  # [B, 3 + T, 3D]
        c = F.conv1d(ext.transpose(1, 2), self.conv.to(p.dtype)[:, None, :], groups=3 * D)
        # [B, T, 3D] contiguous, so q, k, v are views with unit stride over the head dim
        q, k, v = F.silu(c.transpose(1, 2).contiguous()).view(B, T, 3, self.n, self.d).unbind(2)
        q = (F.normalize(q.float(), dim=-1) / math.sqrt(self.d)).to(x.dtype)
        k = F.normalize(k.float(), dim=-1).to(x.dtype)
        m32 = mask.float()[..., None]
        beta = (torch.sigmoid(self.beta(u)) * mask[..., None]).contiguous()
        u32 = u.float()
        g_fast = F.logsigmoid(F.linear(u32, self.decay_fast.weight.float(), self.decay_fast.bias.float())) * m32
        g_slow = F.logsigmoid(F.linear(u32, self.decay_slow.weight.float(), self.decay_slow.bias.float())) * m32
        mix = torch.sigmoid(self.mix(u)).contiguous()
        o, memory = DUAL_DELTA_RULE(q, k, v, beta, g_fast, g_slow, mix, memory)
        y = self.out_norm(o).reshape(B, T, D) * F.silu(self.gate(u))
        return x + self.out(y), memory, _last_real(ext, mask)


def _last_real(ext: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The conv tail to hand on: the last CONV-1 rows of ``ext [B, 3+T, C]`` at real positions
    (the incoming tail counts as real), fp32 ``[B, 3, C]``. Row r of the tail is the first
    position whose running count of real positions reaches ``total - 2 + r``."""
    B = ext.shape[0]
    real = torch.cat([torch.ones(B, CONV - 1, dtype=torch.int64, device=mask.device),
                      (mask > 0).to(torch.int64)], 1)
    count = real.cumsum(1)                                            # [B, 3 + T]
    want = count[:, -1:] - (CONV - 2) + torch.arange(CONV - 1, device=mask.device)[None]
    idx = (count[:, None, :] < want[..., None]).sum(-1)               # [B, 3]
    return torch.gather(ext.float(), 1, idx[..., None].expand(-1, -1, ext.shape[2]))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int = 4):
        super().__init__()
        self.norm = RMSNorm32(d_model)
        self.up = nn.Linear(d_model, mult * d_model)
        self.down = nn.Linear(mult * d_model, d_model)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def make_ffn(d_model: int, ffn: dict | None) -> nn.Module:
    """The FFN of each layer: GELU 4x by default, or the ``moe`` plugin's Switch block
    ``MoEFeedForward`` (``{"kind": "moe", "n_experts": E, "d_ff": f, "capacity_factor": cf}``;
    ``d_ff`` defaults to ``4 * d_model``, ``capacity_factor`` to 0: no dropping)."""
    if not ffn or ffn.get("kind", "dense") == "dense":
        return FeedForward(d_model)
    if ffn["kind"] == "moe":
        from seqdeploy_moe.model import moe_ffn_from_config

        return moe_ffn_from_config(d_model, ffn)
    raise ValueError(f"lam: unknown ffn kind {ffn['kind']!r} (dense or moe)")


class LamEncoder(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int,
                 ffn: dict | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"lam: d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mixers = nn.ModuleList(DualDeltaMixer(d_model, n_heads) for _ in range(n_layers))
        self.ffns = nn.ModuleList(make_ffn(d_model, ffn) for _ in range(n_layers))
        self.routed = not isinstance(self.ffns[0], FeedForward)   # MoE: also returns routes
        self.norm = RMSNorm32(d_model)

    def forward(self, input_ids, attention_mask, memory, conv):
        # index_select, not nn.Embedding: the exporter names aten.embedding's value
        # "embedding", which would collide with the output of that name
        x = self.embed.weight.index_select(0, input_ids.reshape(-1)).view(*input_ids.shape, -1)
        mask = attention_mask.to(x.dtype)
        memories, tails, routes = [], [], []
        for i, (mixer, ffn) in enumerate(zip(self.mixers, self.ffns)):
            x, mem, tail = mixer(x, mask, memory[:, i], conv[:, i])
            if self.routed:
                x, expert = ffn(x, mask=attention_mask)
                routes.append(expert)
            else:
                x = ffn(x)
            memories.append(mem)
            tails.append(tail)
        states = self.norm(x)
        m = attention_mask.to(torch.float32)[..., None]
        pooled = (states.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        embedding = F.normalize(pooled, dim=-1).to(states.dtype)
        out = (states, embedding, torch.stack(memories, 1), torch.stack(tails, 1))
        return (*out, torch.stack(routes, -1)) if self.routed else out
