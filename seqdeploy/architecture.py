"""The Architecture contract every model plugin implements, and its IO checks.

An architecture names its presets, builds its PyTorch model, declares its ONNX inputs and
outputs (:class:`TensorSpec`), makes seeded example inputs, and states its parity limits.
The core runs export, FP16 conversion, validation and benchmarks from these alone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from seqdeploy.bench import OpBenchmark
from seqdeploy.errors import InputError, SeqdeployError

BATCH = "batch"
SEQ = "seq"


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``dtype`` is ``"float"`` (follows the model precision: fp32 or fp16), ``"float32"``
    (always fp32), ``"int64"`` or ``"bool"``. ``shape`` holds ints and the symbolic axis names
    ``"batch"`` and ``"seq"``, which are dynamic in the exported ONNX.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""
    #: valid value range [lo, hi) of an integer input (token ids), checked before running
    bounds: tuple[int, int] | None = None

    def torch_dtype(self, precision: str) -> torch.dtype:
        if self.dtype == "float":
            return torch.float16 if precision == "fp16" else torch.float32
        return {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}[self.dtype]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ParityLimits:
    """Pass limits against the fp32 PyTorch reference. NaN or Inf always fails."""

    rel_l2: float
    cosine: float = 0.0
    max_abs: float = math.inf


DEFAULT_LIMITS = {
    "fp32": ParityLimits(rel_l2=1e-5),
    "fp16": ParityLimits(rel_l2=5e-3, cosine=0.9999),
}


class Architecture:
    """Base class for model plugins. Subclasses set the class attributes and implement
    :meth:`build`, :meth:`input_specs`, :meth:`output_specs` and :meth:`make_inputs`."""

    name: str = ""
    description: str = ""
    presets: dict[str, dict[str, Any]] = {}
    ops: tuple[str, ...] = ()  # names of the CustomOps the model calls
    #: input state name -> output state name; empty when the model cannot stream
    state_map: dict[str, str] = {}
    #: parameter-name substrings kept in fp32 by the FP16 policy (decays, time constants)
    fp32_parameters: tuple[str, ...] = ()
    #: preset used when the hardware is a CPU / a CUDA GPU (``seqdeploy run`` with no preset)
    cpu_preset: str = "tiny"
    gpu_preset: str = "tiny"

    # -- configuration ---------------------------------------------------------------------
    def config(self, preset: str) -> dict[str, Any]:
        if preset not in self.presets:
            known = ", ".join(self.presets)
            raise SeqdeployError(f"{self.name}: unknown preset {preset!r} (known: {known})")
        return copy.deepcopy(self.presets[preset])

    def seq_len(self, config: dict[str, Any]) -> int:
        """The sequence length the preset is meant for."""
        return int(config.get("seq_len", 128))

    def max_seq_len(self, config: dict[str, Any]) -> int | None:
        """Longest T the model allows (None: unbounded)."""
        return None

    def bench_shapes(self, config: dict[str, Any]) -> list[tuple[int, int]]:
        """(batch, T) points ``seqdeploy bench`` runs when none are given."""
        return [(int(config.get("bench_batch", 8)), self.seq_len(config))]

    def parity_limits(self, precision: str, config: dict[str, Any]) -> ParityLimits:
        return DEFAULT_LIMITS[precision]

    # -- model and IO ----------------------------------------------------------------------
    def build(self, config: dict[str, Any]) -> torch.nn.Module:
        """The model. ``forward`` takes the inputs in ``input_specs`` order, positionally, and
        returns a tuple in ``output_specs`` order."""
        raise NotImplementedError

    def input_specs(self, config: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def output_specs(self, config: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def make_inputs(self, config: dict[str, Any], batch: int, seq_len: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded example inputs on the CPU, floats in fp32."""
        raise NotImplementedError

    def op_benchmarks(self, config: dict[str, Any], batch: int, seq_len: int,
                      dtype: torch.dtype, device: str) -> list[OpBenchmark]:
        """Each recurrence op alone at the model's shapes, for GB/s against HBM bandwidth."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "presets": sorted(self.presets), "ops": list(self.ops),
                "streaming": bool(self.state_map)}


def check_inputs(specs: list[TensorSpec], inputs: dict[str, Any], precision: str,
                 values: bool = True) -> None:
    """Raise :class:`InputError` with one line naming the first problem found.

    Checks names, rank, static dims, consistent batch/seq dims and dtype; with ``values`` also
    finiteness of floats and the value range of integer inputs (``TensorSpec.bounds``), which
    on a GPU costs a device synchronisation.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing:
        raise InputError(f"missing input(s) {', '.join(missing)} (expected {', '.join(names)})")
    if extra:
        raise InputError(f"unexpected input(s) {', '.join(extra)} (expected {', '.join(names)})")
    symbols: dict[str, tuple[int, str]] = {}
    for spec in specs:
        value = inputs[spec.name]
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        shape = tuple(tensor.shape)
        want = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        if len(shape) != len(spec.shape):
            raise InputError(f"input {spec.name}: expected shape {want}, got {list(shape)}")
        for axis, (dim, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(dim, str):
                if got < 1:
                    raise InputError(f"input {spec.name}: axis {axis} ({dim}) must be >= 1, got {got}")
                seen = symbols.setdefault(dim, (got, spec.name))
                if seen[0] != got:
                    raise InputError(f"input {spec.name}: {dim} is {got} but {seen[1]} has {seen[0]}")
            elif got != dim:
                raise InputError(f"input {spec.name}: expected shape {want}, got {list(shape)}")
        dtype = spec.torch_dtype(precision)
        if tensor.dtype != dtype:
            raise InputError(f"input {spec.name}: expected dtype {str(dtype).replace('torch.', '')}, "
                             f"got {str(tensor.dtype).replace('torch.', '')}")
        if values:
            raise_bad_values(spec, tensor)


def raise_bad_values(spec: TensorSpec, tensor: torch.Tensor) -> None:
    """The value checks of :func:`check_inputs` for one input (a device sync on a GPU)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"input {spec.name}: contains NaN or Inf")
    if spec.bounds is not None and tensor.numel():
        lo, hi = spec.bounds
        tmin, tmax = tensor.min().item(), tensor.max().item()   # (not truncated to int)
        if tmin < lo or tmax >= hi:
            raise InputError(f"input {spec.name}: values must lie in [{lo}, {hi}), "
                             f"got [{tmin}, {tmax}]")
