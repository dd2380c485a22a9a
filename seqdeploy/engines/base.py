"""The Engine contract: an artifact plus a precision gives a Session whose ``run`` returns outputs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


class Engine:
    """Subclasses set ``name`` and ``description`` and implement ``check`` and ``load``."""

    name: str = ""
    description: str = ""
    #: engines that compute in the artifact's own weights through PyTorch need no ONNX file
    needs_onnx: bool = False

    def check(self, device: str) -> None:
        """Raise :class:`EngineUnavailable` with a one-line reason when it cannot run here."""

    def load(self, artifact: "Artifact", registry: "Registry", precision: str,
             device: str) -> Session:
        raise NotImplementedError
