"""Comparison of outputs: metrics, limits and the pass/fail report of ``validate``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from seqdeploy.architecture import ParityLimits


@dataclass
class Metrics:
    max_abs: float
    rel_l2: float
    cosine: float
    finite: bool

    def passes(self, limits: ParityLimits) -> bool:
        return (self.finite and self.rel_l2 <= limits.rel_l2 and self.cosine >= limits.cosine
                and self.max_abs <= limits.max_abs)

    def failure(self, limits: ParityLimits) -> str:
        """Why it fails, in words ('' when it passes)."""
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


def compare(reference: torch.Tensor, output: torch.Tensor) -> Metrics:
    """Metrics of ``output`` against ``reference``, both computed in float64."""
    ref = reference.detach().double().cpu().reshape(-1)
    out = output.detach().double().cpu().reshape(-1)
    if ref.shape != out.shape:
        return Metrics(math.inf, math.inf, -1.0, False)
    finite = bool(torch.isfinite(out).all())
    if not finite:
        return Metrics(math.inf, math.inf, -1.0, False)
    diff = out - ref
    ref_norm = float(ref.norm())
    out_norm = float(out.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    if ref_norm > 0 and out_norm > 0:
        cosine = float(torch.dot(ref, out)) / (ref_norm * out_norm)
    else:
        cosine = 1.0 if ref_norm == out_norm else 0.0
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return Metrics(max_abs, rel, cosine, finite)


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


def check_outputs(engine: str, precision: str, case: str, reference: dict[str, torch.Tensor],
                  outputs: dict[str, torch.Tensor], limits: ParityLimits) -> list[Check]:
    checks = []
    for name, ref in reference.items():
        if name not in outputs:
            metrics = Metrics(math.inf, math.inf, -1.0, False)
        else:
            metrics = compare(ref, outputs[name])
        checks.append(Check(engine, precision, case, name, metrics, limits, metrics.passes(limits)))
    return checks
