"""PyTorch engines: ``torch`` (ops run their kernels: Triton on CUDA, vectorised on CPU) and
``torch-ref`` (the same model with every op on its step-loop reference)."""
from __future__ import annotations

import contextlib

import torch

from seqdeploy.checkpoint import load_checkpoint
from seqdeploy.engines.base import Engine, Session
from seqdeploy.errors import ArtifactError
from seqdeploy.ops import reference_ops
from seqdeploy.precision import cast_model

WEIGHTS = "model.safetensors"


def load_model(artifact, registry, precision: str, device: str) -> torch.nn.Module:
    """Rebuild the artifact's model, load its checksummed weights, apply the precision policy."""
    arch = registry.architecture(artifact.manifest["arch"])
    try:
        model = arch.build(artifact.manifest["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{artifact.dir}: the manifest's config does not build a "
                            f"{arch.name} model ({type(exc).__name__}: {exc})") from None
    load_checkpoint(model, artifact.path(WEIGHTS))
    cast_model(model, precision, arch.fp32_parameters)
    return model.to(device).eval()


class TorchSession(Session):
    def __init__(self, engine, arch, config, precision, device, model, reference: bool):
        super().__init__(engine, arch, config, precision, device)
        self.model = model
        self.reference = reference

    def prepare(self, inputs):
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self.prepare(inputs)
        ctx = reference_ops() if self.reference else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            outputs = self.model(*(inputs[s.name] for s in self.input_specs))
        return dict(zip((s.name for s in self.output_specs), outputs))


class TorchEngine(Engine):
    name = "torch"
    description = "PyTorch model; ops run their kernels (Triton on CUDA, vectorised on CPU)"
    reference = False

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        arch = registry.architecture(artifact.manifest["arch"])
        model = load_model(artifact, registry, precision, device)
        return TorchSession(self.name, arch, artifact.manifest["config"], precision, device,
                            model, self.reference)


class TorchReferenceEngine(TorchEngine):
    name = "torch-ref"
    description = "PyTorch model with every op on its step-loop reference (the baseline)"
    reference = True

