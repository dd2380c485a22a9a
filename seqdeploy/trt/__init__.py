"""TensorRT for seqdeploy: one adapter for full TensorRT and TensorRT-RTX
(:mod:`~seqdeploy.trt.adapter`), a plugin for every registered op generated from its
definition (:mod:`~seqdeploy.trt.plugins`: the Python ``IPluginV3`` form), the AOT plugin form
for ops with a workspace-free Triton entry under full TensorRT (:mod:`~seqdeploy.trt.aot`),
the engine builder
(:mod:`~seqdeploy.trt.builder`) and the engine cache (:mod:`~seqdeploy.trt.cache`).

:func:`engine_for` is what ``validate``/``bench --engine trt`` and ``optimize --trt`` call:
it returns a verified serialized engine for an artifact and precision, from the artifact's
manifest, the engine cache, or a fresh build.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from seqdeploy.precision import ONNX_FILES

if TYPE_CHECKING:
    from seqdeploy.artifacts import Artifact
    from seqdeploy.plugins import Registry
    from seqdeploy.trt.adapter import TensorRT

Progress = Callable[[str], None]


def current_target(rt: "TensorRT | None" = None) -> str:
    """The GPU an engine built now is for: ``sm<major><minor>`` of CUDA device 0 when this
    TensorRT runs engines there, else ``cpu-build``: no GPU, or TensorRT-RTX on a GPU it
    cannot run on; it then builds for every compute capability it runs on
    (:func:`seqdeploy.trt.builder.build_engine`)."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if rt is None or rt.runs_on((major, minor))[0]:
            return f"sm{major}{minor}"
    return "cpu-build"


def plan_name(precision: str, target: str, use_plugins: bool = True) -> str:
    """The engine's file name in an artifact: ``model.<precision>.<target>.plan``."""
    form = "" if use_plugins else ".function"
    return f"model.{precision}.{target}{form}.plan"


@dataclass
class Engine:
    """A verified serialized engine and where it came from (``built``, ``cache`` or
    ``artifact``)."""

    plan: bytes
    key: str
    source: str
    record: dict[str, Any]


def artifact_ops(registry: "Registry", artifact: "Artifact") -> list:
    arch = registry.architecture(artifact.manifest["arch"])
    return [registry.ops[o] for o in arch.ops if o in registry.ops]


def engine_for(registry: "Registry", artifact: "Artifact", precision: str,
               use_plugins: bool = True, rt: "TensorRT | None" = None,
               target: str | None = None, long_seq: int | None = None,
               progress: Progress = lambda m: None) -> Engine:
    """The engine of ``artifact`` at ``precision``: the one recorded in the manifest when its
    key matches, else the cache's, else built now and cached. Every plan is checked against
    its sha256 before it is returned."""
    from seqdeploy.trt import adapter, aot, builder
    from seqdeploy.trt.cache import EngineCache, cache_dir, engine_key

    rt = rt or adapter.load()
    target = target or current_target(rt)
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    onnx_path = artifact.path(ONNX_FILES[precision])          # checksum-verified
    model_sha = artifact.manifest["files"][ONNX_FILES[precision]]["sha256"]
    profile = builder.profile_shapes(arch, config, **({"long_seq": long_seq} if long_seq else {}))
    ops = artifact_ops(registry, artifact)
    key = engine_key(model_sha, ops, rt.describe(), target, use_plugins, profile.as_json(),
                     aot.plugin_forms(rt, ops))
    name = plan_name(precision, target, use_plugins)
    recorded = artifact.manifest.get("trt", {}).get(name)
    if recorded and recorded.get("key") == key:
        path = artifact.path(name)                               # checksum-verified
        return Engine(path.read_bytes(), key, "artifact", recorded)
    cache = EngineCache(cache_dir(artifact.dir))
    hit = cache.get(key)
    if hit is not None:
        progress(f"engine cache hit {key[:12]}")
        return Engine(hit[0], key, "cache", hit[1])
    progress(f"engine cache miss {key[:12]}: building")
    plan, report = builder.build_engine(rt, onnx_path, precision, profile, ops,
                                        use_plugins=use_plugins,
                                        timing_cache=cache.timing_cache(rt.describe(), target),
                                        target=target, progress=progress)
    record = cache.put(key, plan, report.as_json())
    return Engine(plan, key, "built", record)


def prebuild(registry: "Registry", artifact: "Artifact", precision: str,
             use_plugins: bool = True, progress: Progress = lambda m: None) -> dict[str, Any]:
    """``seqdeploy optimize --trt``: get the engine through the cache and record it in the
    artifact as ``model.<precision>.<target>.plan`` (atomic write, sha256 in the manifest,
    the build record under ``manifest["trt"]``)."""
    from seqdeploy.trt import adapter

    rt = adapter.load()
    target = current_target(rt)
    engine = engine_for(registry, artifact, precision, use_plugins, rt, target, progress=progress)
    name = plan_name(precision, target, use_plugins)
    build = engine.record.get("build", {})
    record = {"key": engine.key, "tensorrt": rt.describe(), "target": target,
              "plugins": use_plugins, "form": build.get("form"),
              "node_forms": build.get("node_forms", {}),
              "sha256": hashlib.sha256(engine.plan).hexdigest(),
              "build": build, "source": engine.source}
    artifact.write(name, lambda p: p.write_bytes(engine.plan), records={"trt": record},
                   kind="tensorrt-engine", precision=precision)
    return {"file": name, **record}
