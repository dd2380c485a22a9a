"""TensorRT engine. For now it only checks that TensorRT and the seqdeploy plugins are
available and says, in one line, why it cannot run; the adapter comes in a later issue."""
from __future__ import annotations

from seqdeploy.engines.base import Engine, Session
from seqdeploy.errors import EngineUnavailable


class TrtEngine(Engine):
    name = "trt"
    description = "TensorRT strongly typed FP16 engine with seqdeploy plugins"
    needs_onnx = True

    def check(self, device: str) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise EngineUnavailable("tensorrt is not installed") from None
        if device != "cuda":
            raise EngineUnavailable("trt needs a CUDA device")
        raise EngineUnavailable("the seqdeploy TensorRT plugins are not built yet "
                                "(tensorrt is installed, but the adapter is missing)")

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        self.check(device)
        raise AssertionError("unreachable")
