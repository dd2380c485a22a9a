"""The Switch encoder and its reusable MoE FFN block (ARCHITECTURES.md section 5).

Shapes: ``input_ids [B, T] int64``, optional complexity ``c [B, T]`` float32 in [0, 1];
outputs ``logits [B, T, V]`` (tied head) and ``routes [B, T, L] int64`` (each layer's expert
per token). Layer: ``x += attn(LN(x))`` (causal self-attention), then ``x += MoE(LN(x))``.
Norm statistics and the router are fp32 whatever the weights' dtype.

Training: :class:`MoEFeedForward` in ``train()`` mode with gradients on multiplies a copy of
the router input by ``U(1 - jitter, 1 + jitter)`` (the experts never see it), takes the gate
from a differentiable softmax (the op decides the expert and which tokens are dropped), runs
the experts through the differentiable mask loop, and keeps its router logits and choices so
a training loop can call :func:`load_balance_loss`, :func:`router_z_loss` or
:func:`auxiliary_losses`.

Another architecture (``ten``, ``lam``) takes the block as its FFN from a config
``"ffn": {"kind": "moe", ...}`` (:func:`is_moe_ffn`, :func:`moe_ffn_from_config`) and declares
the routes it returns with :func:`with_routes` and :func:`routed_limits`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqdeploy.architecture import BATCH, INDEX, SEQ, ParityLimits, TensorSpec
from seqdeploy_moe.experts import MOE_EXPERTS, reference_moe_experts
from seqdeploy_moe.router import TOP1_ROUTER, route_top1, router_logits

# A near-tie between two experts' logits may flip wherever the arithmetic differs (fp16 most
# of all); a flipped token routes through another expert, which is a legitimate result. So
# routes are compared by the share that agrees, at least this much per precision.
ROUTE_AGREEMENT = {"fp32": 0.999, "fp16": 0.98}


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are fp32 (the fp32 island of the FP16 policy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class MoEFeedForward(nn.Module):
    """Pre-norm Switch FFN block: ``x + MoE(LN(x))``, top-1 routing over ``n_experts`` experts
    ``FFN_e(u) = GELU(u W1_e + b1_e) W2_e + b2_e``.

    Args:
        d_model: width of ``x [B, T, d_model]``.
        d_ff: hidden width of each expert.
        n_experts: E.
        capacity_factor: per-row capacity ``ceil(cf * T / E)``; ``<= 0`` drops nothing (the
            inference default). An attribute, so a training loop may change it.
        jitter: epsilon of the training-time multiplicative router-input noise (0: none).
        complexity: learn ``w_c [E]`` so that ``forward(x, c)`` adds ``c ⊗ w_c`` to the logits.

    Router parameters are named ``router*``: list ``"router"`` in an architecture's
    ``fp32_parameters`` so the FP16 policy keeps them fp32.
    ``forward(x, c=None, mask=None) -> (x + y, expert [B, T] int64)``; an encoder with padding
    passes ``mask [B, T]`` (1 = real token): a padded token runs no expert, takes no capacity
    (:func:`keep_real_within_capacity`) and reports expert -1.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, capacity_factor: float = 0.0,
                 jitter: float = 0.0, complexity: bool = False):
        super().__init__()
        self.n_experts = n_experts
        self.capacity_factor = float(capacity_factor)
        self.jitter = float(jitter)
        self.norm = LayerNorm32(d_model)
        self.router = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.router.weight, std=d_model ** -0.5)
        self.router_complexity = nn.Parameter(0.5 * torch.randn(n_experts)) if complexity else None
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * d_model ** -0.5)
        self.b1 = nn.Parameter(0.02 * torch.randn(n_experts, d_ff))
        self.w2 = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * d_ff ** -0.5)
        self.b2 = nn.Parameter(0.02 * torch.randn(n_experts, d_model))
        self.last_logits: torch.Tensor | None = None
        self.last_expert: torch.Tensor | None = None

    def router_logits(self, u: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 ``[B, T, E]`` logits of the normalised input ``u``."""
        if self.training and self.jitter > 0:
            r = u.float()
            r = r * torch.empty_like(r).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(r, self.router.weight.float())
        else:
            logits = router_logits(u, self.router.weight)
        if self.router_complexity is not None:
            if c is None:
                raise ValueError("this MoE block was built with complexity=True: pass c [B, T]")
            logits = logits + c.float()[..., None] * self.router_complexity.float()
        return logits

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        u = self.norm(x)
        if (self.router_complexity is None and not self.training
                and (mask is not None or self.capacity_factor <= 0)):
            # routed without capacity (a padded batch applies it over its real tokens below):
            # projection and router in one step where a kernel can take both
            logits, expert, gate = route_top1(u, self.router.weight)
        else:
            logits = self.router_logits(u, c)
            # the op's capacity counts every token of the row, padding included: route a
            # padded batch with no dropping and apply the capacity over the real tokens only
            expert, gate = TOP1_ROUTER(logits, self.capacity_factor if mask is None else 0.0)
        if mask is not None:
            keep = keep_real_within_capacity(expert, mask, self.capacity_factor, self.n_experts)
            gate = torch.where(keep, gate, torch.zeros_like(gate))
        if self.training and torch.is_grad_enabled():
            real = None if mask is None else mask > 0      # the losses see real tokens only
            self.last_logits = logits if real is None else logits[real]
            self.last_expert = expert if real is None else expert[real]
            # the custom ops have no backward: differentiable gate, experts by the mask loop
            p = torch.softmax(logits, dim=-1).gather(-1, expert[..., None])[..., 0]
            gate = torch.where(gate > 0, p, torch.zeros_like(p))
            y = reference_moe_experts(u, expert, gate, self.w1, self.b1, self.w2, self.b2)
        else:
            y = MOE_EXPERTS(u, expert, gate, self.w1, self.b1, self.w2, self.b2)
        if mask is not None:
            expert = torch.where(mask > 0, expert, torch.full_like(expert, -1))
        return x + y, expert


def keep_real_within_capacity(expert: torch.Tensor, mask: torch.Tensor, capacity_factor: float,
                              n_experts: int) -> torch.Tensor:
    """Which tokens keep their gate in a row with padding: ``bool [B, T]``.

    ``expert [B, T] int64``, ``mask [B, T]`` (any dtype, > 0 = real token). A padded token
    keeps none (it goes through no expert and takes no capacity). With ``capacity_factor >
    0`` a real token keeps its gate when it is among the first ``cap`` real tokens of its row
    routed to its expert, ``cap = ceil(fp32(fp32(cf) * n_real) / E)`` with ``n_real`` the
    row's real tokens: the router op's rule (``router.capacity``) applied to the row with
    its padding removed, so padding a row never changes which of its tokens are dropped.
    """
    real = mask > 0
    if capacity_factor <= 0:
        return real
    arange = torch.arange(n_experts, device=expert.device)
    hot = ((expert[..., None] == arange) & real[..., None]).to(torch.int64)   # [B, T, E]
    rank = (hot.cumsum(dim=1) * hot).sum(dim=-1)      # 1-based rank among its expert's real tokens
    n_real = real.to(torch.int64).sum(dim=1, keepdim=True).to(torch.float32)
    cap = torch.ceil(n_real * float(np.float32(capacity_factor)) / n_experts)   # fp32, as the op
    return real & (rank <= cap)


# -- the block inside another architecture ("ffn": {"kind": "moe", ...}) --------------------
def is_moe_ffn(ffn: dict | None) -> bool:
    """Whether a host architecture's FFN config asks for :class:`MoEFeedForward`
    (``{"kind": "moe", ...}``) rather than its dense FFN (``None`` or ``{"kind": "dense"}``)."""
    kind = (ffn or {}).get("kind", "dense")
    if kind not in ("dense", "moe"):
        raise ValueError(f"unknown ffn kind {kind!r} (dense or moe)")
    return kind == "moe"


def moe_ffn_from_config(d_model: int, ffn: dict) -> MoEFeedForward:
    """The block of ``{"kind": "moe", "n_experts": E, "d_ff": f, "capacity_factor": cf}``:
    ``d_ff`` defaults to ``4 * d_model``, ``capacity_factor`` to 0 (no dropping)."""
    return MoEFeedForward(d_model, ffn.get("d_ff", 4 * d_model), ffn["n_experts"],
                          ffn.get("capacity_factor", 0.0))


def with_routes(specs: list[TensorSpec], n_layers: int,
                doc: str = "expert chosen per token and layer") -> list[TensorSpec]:
    """A recurrent host's output specs once its FFNs are :class:`MoEFeedForward`: each output
    ``depends_on`` the new last output ``routes [B, T, L] int64`` (each layer's ``expert``,
    stacked on the last axis), an ``index`` output marked ``causal`` because the recurrence
    carries a flipped route on to every later step of its row."""
    return [dataclasses.replace(s, depends_on="routes") for s in specs] + [
        TensorSpec("routes", "int64", (BATCH, SEQ, n_layers), doc, kind=INDEX, causal=True)]


def routed_limits(precision: str, limits: ParityLimits, names) -> dict[str, ParityLimits]:
    """Parity limits of a host with routes: ``routes`` by agreement (:data:`ROUTE_AGREEMENT`),
    each output of ``names`` by the host's ``limits`` where the routes agree."""
    return {"routes": ParityLimits(rel_l2=0.0, min_agreement=ROUTE_AGREEMENT[precision]),
            **{name: limits for name in names}}


def load_balance_loss(logits: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i P_i``: ``f_i`` the fraction of tokens routed
    to expert i, ``P_i`` the mean router probability of expert i (``logits [..., E]``,
    ``expert [...]``). 1.0 at perfect balance."""
    E = logits.shape[-1]
    f = F.one_hot(expert.reshape(-1), E).float().mean(dim=0)
    P = torch.softmax(logits.float().reshape(-1, E), dim=-1).mean(dim=0)
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)``: keeps the logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def auxiliary_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Both losses summed over every :class:`MoEFeedForward` of ``model``, from its last
    training forward: ``{"load_balance": ..., "z_loss": ...}``."""
    blocks = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.last_logits is not None]
    if not blocks:
        raise ValueError("no MoE block has run a training forward (model.train(), grad on)")
    return {"load_balance": sum(load_balance_loss(m.last_logits, m.last_expert) for m in blocks),
            "z_loss": sum(router_z_loss(m.last_logits) for m in blocks)}


class CausalSelfAttention(nn.Module):
    """Pre-norm multi-head causal self-attention: ``x + W_o attn(LN(x))``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.norm = LayerNorm32(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))              # [B, H, T, dh]
        scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D // self.n_heads))
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(v.dtype)
        o = (attn @ v).transpose(1, 2).reshape(B, T, D)
        return x + self.out(o)


class SwitchEncoder(nn.Module):
    """Embedding, L x (causal attention, MoE FFN), final LayerNorm, tied LM head.
    ``forward(input_ids [B, T], c [B, T] | None) -> (logits [B, T, V], routes [B, T, L])``."""

    def __init__(self, vocab: int, d_model: int, d_ff: int, n_experts: int, n_layers: int,
                 n_heads: int, capacity_factor: float = 0.0, jitter: float = 0.0,
                 complexity: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.attns = nn.ModuleList(CausalSelfAttention(d_model, n_heads) for _ in range(n_layers))
        self.moes = nn.ModuleList(MoEFeedForward(d_model, d_ff, n_experts, capacity_factor, jitter,
                                                 complexity) for _ in range(n_layers))
        self.norm = LayerNorm32(d_model)

    def forward(self, input_ids: torch.Tensor, c: torch.Tensor | None = None):
        x = self.embed(input_ids)
        routes = []
        for attn, moe in zip(self.attns, self.moes):
            x, expert = moe(attn(x), c)
            routes.append(expert)
        logits = F.linear(self.norm(x), self.embed.weight)
        return logits, torch.stack(routes, dim=-1)
