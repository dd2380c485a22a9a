"""Registers the built-in engines through the same hook a third-party engine uses."""
from __future__ import annotations

from seqdeploy.engines import ort
from seqdeploy.engines.torch import TorchEngine, TorchReferenceEngine
from seqdeploy.engines.trt import TrtEngine
from seqdeploy.engines.trt import register_commands  # noqa: F401  (optimize --trt)
from seqdeploy.hookspecs import hookimpl


@hookimpl
def register_engines(register):
    for engine in (TorchEngine(), TorchReferenceEngine(), ort.OrtEngine(), ort.OrtOnnxEngine(),
                   TrtEngine()):
        register(engine)


@hookimpl
def register_commands(cli):
    ort.register_commands(cli)   # seqdeploy build-ort-ops
