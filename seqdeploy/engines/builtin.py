"""Registers the built-in engines through the same hook a third-party engine uses."""
from __future__ import annotations

from seqdeploy.engines import ort, trt
from seqdeploy.engines.torch import TorchEngine, TorchReferenceEngine
from seqdeploy.hookspecs import hookimpl


@hookimpl
def register_engines(register):
    for engine in (TorchEngine(), TorchReferenceEngine(), ort.OrtEngine(), ort.OrtGraphEngine(),
                   ort.OrtOnnxEngine(), trt.TrtEngine()):
        register(engine)


@hookimpl
def register_commands(cli):
    ort.register_commands(cli)   # seqdeploy build-ort-ops
    trt.register_commands(cli)   # seqdeploy optimize --trt / --no-plugins
