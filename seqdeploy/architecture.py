"""The Architecture contract every model plugin implements, and its IO checks.

An architecture names its presets, builds its PyTorch model, declares its ONNX inputs and
outputs (:class:`TensorSpec`), makes seeded example inputs, and states its parity limits.
The core runs export, FP16 conversion, validation and benchmarks from these alone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from seqdeploy.bench import OpBenchmark
from seqdeploy.errors import InputError, SeqdeployError

BATCH = "batch"
SEQ = "seq"

# What a tensor is; validation, streaming and parity treat each kind its own way.
STEP = "step"        #: [batch, seq, ...]: one value per time step
STATE = "state"      #: recurrent state, carried from one call (or step) to the next
POOLED = "pooled"    #: [batch, ...], no time axis: a summary of the whole sequence
INDEX = "index"      #: integer ids (a router's expert choice): compared by agreement rate
MASK = "mask"        #: [batch, seq] input, 1 = real token, 0 = padding
KINDS = (STEP, STATE, POOLED, INDEX, MASK)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``dtype`` is ``"float"`` (follows the model precision: fp32 or fp16), ``"float32"``
    (always fp32: recurrent state crosses the graph boundary in fp32 even in fp16 graphs),
    ``"int64"`` or ``"bool"``. ``shape`` holds ints and symbolic axis names: ``"batch"``,
    ``"seq"`` and any listed in :attr:`Architecture.axes`, all dynamic in the exported ONNX.

    ``kind`` says what the tensor is (:data:`KINDS`); left empty it is ``"step"`` when the
    shape has a ``seq`` axis and ``"state"`` otherwise, so a pooled output must say so.
    ``depends_on`` names an ``index`` output: this output is compared only at the positions
    (rows, or rows and steps) where the engine's ids agree with the reference's.
    ``causal`` (``index`` outputs, along their ``seq`` axis): an id at step t also changes
    every later step of its row (a recurrence or causal attention carries it on), so a
    dependant is compared at step t only where every id of the row up to t agrees.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""
    #: valid value range [lo, hi) of an integer input (token ids), checked before running
    bounds: tuple[int, int] | None = None
    kind: str = ""
    depends_on: str | None = None
    causal: bool = False

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", STEP if SEQ in self.shape else STATE)
        if self.kind not in KINDS:
            raise SeqdeployError(f"tensor {self.name}: unknown kind {self.kind!r} "
                                 f"(one of {', '.join(KINDS)})")
        if self.kind in (STATE, POOLED) and SEQ in self.shape:
            raise SeqdeployError(f"tensor {self.name}: a {self.kind} tensor has no {SEQ!r} axis")
        if self.causal and self.kind != INDEX:
            raise SeqdeployError(f"tensor {self.name}: only an {INDEX} tensor can be causal")

    @property
    def seq_axis(self) -> int | None:
        return self.shape.index(SEQ) if SEQ in self.shape else None

    def torch_dtype(self, precision: str) -> torch.dtype:
        if self.dtype == "float":
            return torch.float16 if precision == "fp16" else torch.float32
        return {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}[self.dtype]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ParityLimits:
    """Pass limits against the fp32 PyTorch reference. NaN or Inf always fails.
    ``min_agreement`` applies to ``index`` outputs: the share of ids equal to the reference's."""

    rel_l2: float
    cosine: float = 0.0
    max_abs: float = math.inf
    min_agreement: float = 1.0


@dataclass(frozen=True)
class Case:
    """One validation case: ``batch`` rows of ``seq_len`` steps from seed ``seed``.

    - ``split``: also run the sequence as two calls, [0, split) then the rest, passing the
      state across (needs ``state_map``).
    - ``inputs``: ``(config, batch, seq_len, seed) -> inputs``, replacing ``make_inputs``
      (routing near-ties, extreme values).
    - ``ragged``: the core pads the rows to different lengths (zeros at the end of the
      ``mask`` input: row ``i`` keeps about ``T / (i + 1)`` steps); each row is also run
      alone, trimmed to its length, and must give the padded batch's results.
    """

    name: str
    batch: int
    seq_len: int
    split: int | None = None
    seed: int | None = None
    inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    ragged: bool = False


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
    #: symbolic axes beyond batch and seq, dynamic in ONNX: name -> {"min": m, "max": n}
    axes: dict[str, dict[str, int]] = {}

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

    def parity_limits(self, precision: str, config: dict[str, Any]
                      ) -> ParityLimits | dict[str, ParityLimits]:
        """Limits for every output, or per output name (names left out get the defaults)."""
        return DEFAULT_LIMITS[precision]

    def limits_for(self, precision: str, config: dict[str, Any], output: str) -> ParityLimits:
        limits = self.parity_limits(precision, config)
        if isinstance(limits, ParityLimits):
            return limits
        return limits.get(output, DEFAULT_LIMITS[precision])

    def validation_cases(self, config: dict[str, Any], long_seq: int = 4096) -> list[Case]:
        """The cases ``validate`` runs: batch 1 and 2; T = 1, 63, the preset's and a long T;
        a split-sequence case when the model streams; a ragged-length batch when it takes a
        mask. Extend the list (``super().validation_cases(...) + [...]``) for cases of your
        own, such as routing near-ties."""
        preset_t = self.seq_len(config)
        limit = self.max_seq_len(config)
        long_t = min(long_seq, limit) if limit else long_seq
        cases = [Case("B1-T1", 1, 1), Case("B2-T63", 2, 63), Case(f"B2-T{preset_t}", 2, preset_t),
                 Case(f"B1-T{long_t}", 1, long_t)]
        if self.state_map and preset_t >= 2:
            cut = min(preset_t // 2 + 1, preset_t - 1)
            cases.append(Case(f"B2-T{preset_t}-split{cut}", 2, preset_t, split=cut))
        if any(s.kind == MASK for s in self.input_specs(config)) and preset_t >= 4:
            cases.append(Case(f"B3-T{preset_t}-ragged", 3, preset_t, ragged=True))
        seen, unique = set(), []
        for c in cases:
            if c.name not in seen:
                seen.add(c.name)
                unique.append(c)
        return unique

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
        """Seeded example inputs on the CPU, floats in fp32 (a ``mask`` input all ones)."""
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
