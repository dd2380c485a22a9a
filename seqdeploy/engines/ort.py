"""ONNX Runtime: the CUDA execution provider when onnxruntime-gpu is present and a GPU is
there, else the CPU provider. Custom nodes run their model-local fallback functions."""
from __future__ import annotations

import numpy as np
import torch

from seqdeploy.engines.base import Engine, Session, StepRunner
from seqdeploy.errors import ArtifactError, EngineUnavailable
from seqdeploy.precision import ONNX_FILES


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable("onnxruntime is not installed (pip install onnxruntime or "
                                "onnxruntime-gpu)") from None
    return onnxruntime


def providers_for(device: str) -> list:
    ort = _ort()
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineUnavailable("onnxruntime has no CUDAExecutionProvider here "
                                    "(install onnxruntime-gpu, or use --device cpu)")
        # TF32 matmuls would cost fp32 models their 1e-5 parity (measured: 8e-4 rel-L2)
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_device(device: str) -> str:
    """ORT runs on CUDA only when onnxruntime-gpu offers it; else on the CPU, and says so."""
    if device == "cuda" and "CUDAExecutionProvider" not in _ort().get_available_providers():
        return "cpu"
    return device


def open_inference_session(path, device: str):
    """An ``InferenceSession`` on ``path`` (already checksum-verified) for ``device``;
    returns it with the device ORT really runs on."""
    ort = _ort()
    device = ort_device(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers_for(device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({first})") from None
    return session, device


class OrtSession(Session):
    def __init__(self, arch, config, precision, device, session):
        super().__init__("ort", arch, config, precision, device)
        self.session = session
        self.provider = session.get_providers()[0]

    def prepare(self, inputs):
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in inputs.items()}

    def _run(self, inputs) -> dict[str, torch.Tensor]:
        feeds = self.prepare(inputs) if any(isinstance(v, torch.Tensor) for v in inputs.values()) else inputs
        names = [s.name for s in self.output_specs]
        outputs = self.session.run(names, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(names, outputs)}

    def synchronize(self) -> None:  # session.run returns host arrays: already synchronous
        pass

    def describe(self) -> str:
        return f"ort[{self.provider}] ({self.precision}, {self.device})"


class OrtEngine(Engine):
    name = "ort"
    description = "ONNX Runtime (CUDA EP with onnxruntime-gpu, else CPU); fallback functions"
    needs_onnx = True
    streams = True

    def open_step(self, artifact, registry, precision: str, device: str) -> StepRunner:
        """The one-step graph (``model.step*.onnx``) in an ORT session; state on the host."""
        from seqdeploy.streaming import STEP_FILES, step_specs

        arch = registry.architecture(artifact.manifest["arch"])
        if not artifact.has(STEP_FILES[precision]):
            raise ArtifactError(f"{artifact.dir}: no {STEP_FILES[precision]}; export with "
                                f"`seqdeploy export {arch.name} --streaming`"
                                + (" and run `optimize --fp16`" if precision == "fp16" else ""))
        session, _ = open_inference_session(artifact.path(STEP_FILES[precision]), device)
        names = [s.name for s in step_specs(arch.output_specs(artifact.manifest["config"]))]

        def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
            return [torch.from_numpy(o) for o in session.run(names, feeds)]

        return StepRunner(run, "cpu")

    def check(self, device: str) -> None:
        _ort()

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        session, device = open_inference_session(artifact.path(ONNX_FILES[precision]), device)
        arch = registry.architecture(artifact.manifest["arch"])
        return OrtSession(arch, artifact.manifest["config"], precision, device, session)
