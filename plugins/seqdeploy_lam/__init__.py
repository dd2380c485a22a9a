"""seqdeploy plugin ``lam``: dual-state gated delta-rule encoder (ARCHITECTURES.md section 4)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seqdeploy.architecture import BATCH, MASK, POOLED, SEQ, STATE, STEP, Architecture, TensorSpec
from seqdeploy.bench import OpBenchmark
from seqdeploy.hookspecs import hookimpl


class Lam(Architecture):
    name = "lam"
    description = "LAM encoder: two gated delta-rule memories per layer (DualDeltaRule), pooled embedding"
    presets = {
        "tiny": {"vocab": 256, "d_model": 64, "n_heads": 2, "n_layers": 2, "seq_len": 128,
                 "bench_batch": 8},
        # the FFN of every layer swapped for the moe plugin's Switch block (top-1, E=4)
        "tiny-moe": {"vocab": 256, "d_model": 64, "n_heads": 2, "n_layers": 2, "seq_len": 128,
                     "bench_batch": 8, "ffn": {"kind": "moe", "n_experts": 4, "d_ff": 128}},
        "base": {"vocab": 30522, "d_model": 768, "n_heads": 12, "n_layers": 6, "seq_len": 512,
                 "bench_batch": 1},
    }
    ops = ("dual_delta_rule",)
    state_map = {"memory": "memory_out", "conv": "conv_out"}
    fp32_parameters = ("decay_", "router")   # router: the MoE FFN's (tiny-moe)
    gpu_preset = "base"

    def build(self, config: dict[str, Any]) -> torch.nn.Module:
        from seqdeploy_lam.model import LamEncoder

        return LamEncoder(config["vocab"], config["d_model"], config["n_heads"], config["n_layers"],
                          config.get("ffn"))

    @staticmethod
    def _routed(config) -> bool:
        """Whether the FFN is the MoE block, so the model also returns its routes."""
        return (config.get("ffn") or {}).get("kind", "dense") == "moe"

    def bench_shapes(self, config):
        """base: the seed's encoder shapes (one request of 128 and of 512 tokens)."""
        if config["d_model"] >= 512:
            return [(1, 128), (1, 512)]
        return [(int(config.get("bench_batch", 8)), self.seq_len(config))]

    def _state_shapes(self, config):
        L, D, n = config["n_layers"], config["d_model"], config["n_heads"]
        d = D // n
        return (BATCH, L, n, 2, d, d), (BATCH, L, 3, 3 * D)

    def input_specs(self, config):
        memory, conv = self._state_shapes(config)
        return [TensorSpec("input_ids", "int64", (BATCH, SEQ), "token ids", (0, config["vocab"])),
                TensorSpec("attention_mask", "int64", (BATCH, SEQ), "1 = real token, 0 = padding",
                           (0, 2), kind=MASK),
                TensorSpec("memory", "float32", memory, "both memories per layer (fast, slow)",
                           kind=STATE),
                TensorSpec("conv", "float32", conv, "causal-conv tails: last 3 q|k|v projections",
                           kind=STATE)]

    def output_specs(self, config):
        memory, conv = self._state_shapes(config)
        specs = [TensorSpec("token_states", "float", (BATCH, SEQ, config["d_model"]), kind=STEP),
                 TensorSpec("embedding", "float", (BATCH, config["d_model"]),
                            "masked mean of token_states, L2-normalised", kind=POOLED),
                 TensorSpec("memory_out", "float32", memory, "both memories after the call",
                            kind=STATE),
                 TensorSpec("conv_out", "float32", conv, "causal-conv tails after the call",
                            kind=STATE)]
        if not self._routed(config):
            return specs
        # with the MoE FFN every output follows the routes (core v2: depends_on): an fp16
        # near-tie between two experts may flip a route legitimately, and the memories carry
        # a flip on to every later token (causal)
        from seqdeploy_moe.model import with_routes

        return with_routes(specs, config["n_layers"],
                           "expert chosen per token and layer (-1 at padding)")

    def parity_limits(self, precision, config):
        limits = super().parity_limits(precision, config)
        if not self._routed(config):
            return limits
        # as the moe plugin's: routes by agreement, every other output where they agree
        from seqdeploy_moe.model import routed_limits

        return routed_limits(precision, limits,
                             ("token_states", "embedding", "memory_out", "conv_out"))

    def make_inputs(self, config, batch, seq_len, seed=0, ragged=False):
        """Random ids, a full mask (``ragged``: row i keeps a seeded length, at least 1, and
        is right-padded), small random states."""
        g = torch.Generator().manual_seed(seed)
        memory, conv = self._state_shapes(config)
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        if ragged:
            lengths = torch.randint(1, seq_len + 1, (batch,), generator=g)
            lengths[0] = seq_len
            mask = (torch.arange(seq_len)[None] < lengths[:, None]).to(torch.int64)
        return {"input_ids": torch.randint(0, config["vocab"], (batch, seq_len), generator=g),
                "attention_mask": mask,
                "memory": 0.1 * torch.randn((batch, *memory[1:]), generator=g),
                "conv": 0.5 * torch.randn((batch, *conv[1:]), generator=g)}

    def op_benchmarks(self, config, batch, seq_len, dtype, device):
        from seqdeploy_lam.model import DUAL_DELTA_RULE

        n = config["n_heads"]
        d = config["d_model"] // n
        g = torch.Generator(device=device).manual_seed(3)
        rand = lambda *s: torch.randn(*s, generator=g, device=device)   # noqa: E731
        q = (F.normalize(rand(batch, seq_len, n, d), dim=-1) / d ** 0.5).to(dtype)
        k = F.normalize(rand(batch, seq_len, n, d), dim=-1).to(dtype)
        v = rand(batch, seq_len, n, d).to(dtype)
        beta, mix = (torch.sigmoid(rand(batch, seq_len, n)).to(dtype) for _ in range(2))
        g_fast = F.logsigmoid(rand(batch, seq_len, n))
        g_slow = F.logsigmoid(rand(batch, seq_len, n) + 3.5)
        state = torch.zeros(batch, n, 2, d, d, device=device)
        moved = 4 * q.numel() * q.element_size() + 2 * state.numel() * 4
        return [OpBenchmark("dual_delta_rule",
                            lambda: DUAL_DELTA_RULE.torch_op(q, k, v, beta, g_fast, g_slow, mix, state),
                            moved, f"B={batch} T={seq_len} n={n} d={d} {str(dtype)[6:]}")]


@hookimpl
def register_architectures(register):
    register(Lam())


@hookimpl
def register_ops(register):
    from seqdeploy_lam.model import DUAL_DELTA_RULE

    register(DUAL_DELTA_RULE)
