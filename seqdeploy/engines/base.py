"""The Engine contract: an artifact plus a precision gives a Session whose ``run`` returns outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from seqdeploy.architecture import check_inputs

if TYPE_CHECKING:
    from seqdeploy.architecture import Architecture
    from seqdeploy.artifacts import Artifact
    from seqdeploy.plugins import Registry


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without a device is an error."""
    from seqdeploy.errors import EngineUnavailable

    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise EngineUnavailable("no CUDA device (asked for --device cuda)")
    if device not in ("cpu", "cuda"):
        raise EngineUnavailable(f"unknown device {device!r} (cpu, cuda or auto)")
    return device


class Session:
    """A loaded model. ``run`` checks inputs against the model's IO specs, then calls
    ``_run``; benchmarks call ``_run`` directly after one checked call."""

    #: its device memory comes from PyTorch's allocator (bench reports the peak)
    allocates_through_torch: bool = False

    def __init__(self, engine: str, arch: "Architecture", config: dict[str, Any],
                 precision: str, device: str):
        self.engine = engine
        self.arch = arch
        self.config = config
        self.precision = precision
        self.device = device
        self.input_specs = arch.input_specs(config)
        self.output_specs = arch.output_specs(config)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_inputs(self.input_specs, inputs, self.precision)
        return self._run(inputs)

    def prepare(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Move inputs where this session wants them (device, format), outside timing."""
        return inputs

    def _run(self, inputs: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def describe(self) -> str:
        return f"{self.engine} ({self.precision}, {self.device})"


@dataclass
class StepRunner:
    """One time step of a model on an engine, for :class:`~seqdeploy.streaming.Stream`.

    ``run(inputs)`` takes every step input (feeds and state, no time axis) by name and
    returns the step outputs in the architecture's output order. ``device`` is where the
    state should live between steps. ``cuda_graphs``: ``run`` is plain PyTorch work on one
    CUDA device, so a stream may capture it once as a CUDA graph and replay it."""

    run: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    device: str
    cuda_graphs: bool = False


#: the role of the engine every other engine is validated against (one per registry)
REFERENCE = "reference"


class Engine:
    """An inference engine, registered through ``register_engines``.

    Subclasses set ``name`` and ``description`` and implement ``check`` and ``load``; an
    engine that can run one time step at a time sets ``streams`` and implements
    :meth:`open_step`. Nothing in the core names an engine: ``validate`` compares against
    the engine whose ``role`` is :data:`REFERENCE`, and ``run`` uses every engine whose
    ``check`` passes on the machine."""

    name: str = ""
    description: str = ""
    #: engines that compute in the artifact's own weights through PyTorch need no ONNX file
    needs_onnx: bool = False
    #: "reference" for the baseline every other engine is compared with, else ""
    role: str = ""
    #: whether :meth:`open_step` is implemented (streaming, step-at-a-time validation)
    streams: bool = False

    def check(self, device: str) -> None:
        """Raise :class:`EngineUnavailable` with a one-line reason when it cannot run here."""

    def load(self, artifact: "Artifact", registry: "Registry", precision: str,
             device: str) -> Session:
        raise NotImplementedError

    def open_step(self, artifact: "Artifact", registry: "Registry", precision: str,
                  device: str) -> StepRunner:
        """A runner of one time step (see :class:`StepRunner`); only where ``streams``."""
        from seqdeploy.errors import SeqdeployError

        raise SeqdeployError(f"engine {self.name} cannot stream")

    def doctor(self, device: str) -> list[tuple[str, str]]:
        """Extra ``(key, value)`` rows for ``seqdeploy doctor`` (versions, capabilities)."""
        return []
