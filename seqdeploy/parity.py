"""Comparison of outputs by kind: metrics, limits and the pass/fail report of ``validate``.

- Float outputs (``step``, ``state``, ``pooled``): max abs error, rel-L2 and cosine in
  float64 against the output's limits at the engine's precision.
- ``index`` outputs: the share of ids equal to the reference's (``min_agreement``).
- An output that ``depends_on`` an index output is compared only where the ids agree (an
  fp16 near-tie may flip a route legitimately; what follows it then differs by design); for
  a ``causal`` index output, only up to the first step of the row where they disagree.
- With a ``mask``, per-step outputs are compared at the real (unpadded) positions only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from seqdeploy.architecture import INDEX, SEQ, ParityLimits, TensorSpec


@dataclass
class Metrics:
    max_abs: float
    rel_l2: float
    cosine: float
    finite: bool
    #: index outputs: share of ids equal to the reference's
    agreement: float | None = None
    #: share of the output's positions compared (mask and route agreement exclude the rest)
    compared: float = 1.0

    def passes(self, limits: ParityLimits) -> bool:
        return not self.failure(limits)

    def failure(self, limits: ParityLimits) -> str:
        """Why it fails, in words ('' when it passes)."""
        if self.agreement is not None:
            if self.agreement < limits.min_agreement:
                return f"agreement {self.agreement:.4f} < {limits.min_agreement}"
            return ""
        if not self.finite:
            return "NaN or Inf in output"
        reasons = []
        if self.rel_l2 > limits.rel_l2:
            reasons.append(f"rel-L2 {self.rel_l2:.3g} > {limits.rel_l2:.3g}")
        if self.cosine < limits.cosine:
            reasons.append(f"cosine {self.cosine:.6f} < {limits.cosine}")
        if self.max_abs > limits.max_abs:
            reasons.append(f"max-abs {self.max_abs:.3g} > {limits.max_abs:.3g}")
        return ", ".join(reasons)


MISSING = Metrics(math.inf, math.inf, -1.0, False)


def compare(reference: torch.Tensor, output: torch.Tensor) -> Metrics:
    """Metrics of ``output`` against ``reference``, both computed in float64."""
    ref = reference.detach().double().cpu().reshape(-1)
    out = output.detach().double().cpu().reshape(-1)
    if ref.shape != out.shape:
        return MISSING
    if not bool(torch.isfinite(out).all()):
        return MISSING
    diff = out - ref
    ref_norm = float(ref.norm())
    out_norm = float(out.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    if ref_norm > 0 and out_norm > 0:
        cosine = float(torch.dot(ref, out)) / (ref_norm * out_norm)
    else:
        cosine = 1.0 if ref_norm == out_norm else 0.0
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return Metrics(max_abs, rel, cosine, True)


def agreement(reference: torch.Tensor, output: torch.Tensor) -> Metrics:
    """Share of equal ids (an empty selection agrees fully)."""
    ref, out = reference.cpu().reshape(-1), output.cpu().reshape(-1)
    if ref.shape != out.shape:
        return Metrics(math.inf, math.inf, -1.0, False, agreement=0.0)
    rate = float((ref == out).double().mean()) if ref.numel() else 1.0
    return Metrics(0.0, 0.0, 1.0, True, agreement=rate)


@dataclass
class Check:
    engine: str
    precision: str
    case: str
    output: str
    metrics: Metrics
    limits: ParityLimits
    passed: bool

    def as_dict(self) -> dict:
        d = asdict(self)
        d["limits"] = {k: (None if v == math.inf else v) for k, v in asdict(self.limits).items()}
        d["metrics"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in asdict(self.metrics).items()}
        d["reason"] = "" if self.passed else self.metrics.failure(self.limits)
        return d


def _positions(spec: TensorSpec, shape: torch.Size, mask: torch.Tensor | None,
               agree: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which leading positions of the output to compare: ``[B, T]`` for per-step outputs
    (``[B]`` otherwise), or None for all of them."""
    per_step = spec.seq_axis == 1 and len(shape) >= 2
    keep = None
    if mask is not None and per_step:
        keep = mask.cpu().bool()
    if spec.depends_on is not None and spec.depends_on in agree:
        rows = agree[spec.depends_on]                           # [B, T] or [B]
        if not per_step and rows.dim() == 2:
            rows = rows.all(dim=1)
        elif per_step and rows.dim() == 1:
            rows = rows[:, None].expand(-1, shape[1])
        keep = rows if keep is None else keep & rows
    return keep


def check_outputs(engine: str, precision: str, case: str, reference: dict[str, torch.Tensor],
                  outputs: dict[str, torch.Tensor], specs: list[TensorSpec],
                  limits: Callable[[str], ParityLimits],
                  mask: torch.Tensor | None = None) -> list[Check]:
    """One :class:`Check` per output of ``specs`` present in ``reference``, each compared by
    its kind (module docstring). ``limits(name)`` gives an output's limits."""
    checks = []
    agree: dict[str, torch.Tensor] = {}
    for spec in specs:          # index outputs first: their dependants need the agreement
        if spec.kind == INDEX and spec.name in reference and spec.name in outputs:
            ref, out = reference[spec.name].cpu(), outputs[spec.name].cpu()
            if ref.shape == out.shape:
                same = ref == out
                lead = 2 if spec.seq_axis == 1 else 1
                same = same.reshape(*same.shape[:lead], -1).all(dim=-1)
                if spec.causal and lead == 2:      # a flip changes every later step too
                    same = same.to(torch.int64).cumprod(dim=1).bool()
                agree[spec.name] = same
    for spec in specs:
        name = spec.name
        if name not in reference:
            continue
        lim = limits(name)
        if name not in outputs:
            metrics = MISSING
        else:
            ref, out = reference[name].cpu(), outputs[name].cpu()
            keep = _positions(spec, ref.shape, mask, agree) if ref.shape == out.shape else None
            if keep is not None:
                total = keep.numel()
                ref, out = ref[keep], out[keep]
                compared = float(keep.sum()) / total if total else 1.0
            else:
                compared = 1.0
            metrics = agreement(ref, out) if spec.kind == INDEX else compare(ref, out)
            metrics.compared = compared
        checks.append(Check(engine, precision, case, name, metrics, lim, metrics.passes(lim)))
    return checks


def seq_outputs(specs: list[TensorSpec]) -> dict[str, int]:
    """Outputs with a time axis (per-step floats and ids): name -> axis."""
    return {s.name: s.shape.index(SEQ) for s in specs if SEQ in s.shape}
