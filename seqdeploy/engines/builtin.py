"""Registers the built-in engines through the same hook a third-party engine uses."""
from __future__ import annotations

from seqdeploy.engines.ort import OrtEngine
from seqdeploy.engines.torch import TorchEngine, TorchReferenceEngine
from seqdeploy.engines.trt import TrtEngine
from seqdeploy.engines.trt import register_commands  # noqa: F401  (optimize --trt)
from seqdeploy.hookspecs import hookimpl


@hookimpl
def register_engines(register):
    for engine in (TorchEngine(), TorchReferenceEngine(), OrtEngine(), TrtEngine()):
        register(engine)
