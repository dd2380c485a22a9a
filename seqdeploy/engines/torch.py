"""PyTorch engines: ``torch`` (ops run their kernels: Triton on CUDA, vectorised on CPU) and
``torch-ref`` (the same model with every op on its step-loop reference)."""
from __future__ import annotations

import contextlib

import torch

from seqdeploy.checkpoint import load_checkpoint
from seqdeploy.engines.base import REFERENCE, Engine, Session, StepRunner
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
    allocates_through_torch = True

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
    streams = True
    reference = False

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        arch = registry.architecture(artifact.manifest["arch"])
        model = load_model(artifact, registry, precision, device)
        return TorchSession(self.name, arch, artifact.manifest["config"], precision, device,
                            model, self.reference)

    def open_step(self, artifact, registry, precision: str, device: str) -> StepRunner:
        """The model wrapped as one step (:class:`~seqdeploy.streaming.StepModule`); on CUDA
        the kernel engine's step may be captured as a CUDA graph."""
        from seqdeploy.streaming import StepModule, step_specs

        arch = registry.architecture(artifact.manifest["arch"])
        config = artifact.manifest["config"]
        model = load_model(artifact, registry, precision, device)
        step = StepModule(model, arch.input_specs(config), arch.output_specs(config))
        names = [s.name for s in step_specs(arch.input_specs(config))]
        reference = self.reference

        def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            with (reference_ops() if reference else contextlib.nullcontext()), torch.inference_mode():
                return list(step(*(inputs[n].to(device) for n in names)))

        return StepRunner(run, device, cuda_graphs=device == "cuda" and not reference)


class TorchReferenceEngine(TorchEngine):
    name = "torch-ref"
    description = "PyTorch model with every op on its step-loop reference (the baseline)"
    role = REFERENCE
    reference = True

