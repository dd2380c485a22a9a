"""The engine cache: serialized engines keyed by everything that decides their bytes.

    key = sha256(model file bytes, plugin names and versions, TensorRT flavour and version,
                 target GPU, plugin or function form, each op's plugin form (AOT or Python;
                 AOT with its entry kernel's sources and Triton version), optimisation
                 profile)

Each entry is ``<key>.plan`` plus ``<key>.json`` (the plan's sha256 and size, and the build
report). A lookup checks the plan against its sha256 first: a truncated or edited engine is
refused in one line, never deserialized. Writes are atomic, the plan before its record, so
an interrupted build leaves no entry that loads.

The cache lives in ``<artifact>/.trt-cache/`` (or ``$SEQDEPLOY_TRT_CACHE``), beside the
timing cache of each (TensorRT, target) pair.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import seqdeploy
from seqdeploy.artifacts import atomic_write, sha256_file
from seqdeploy.errors import ArtifactError
from seqdeploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION
from seqdeploy.trt.aot import FORM_AOT, FORM_PYTHON

CACHE_DIR = ".trt-cache"
#: bump when the plugin factory's behaviour changes in a way engines would bake in
PLUGIN_FACTORY_VERSION = "1"


def cache_dir(artifact_dir: Path) -> Path:
    env = os.environ.get("SEQDEPLOY_TRT_CACHE")
    return Path(env) if env else Path(artifact_dir) / CACHE_DIR


def engine_key(model_bytes_sha256: str, ops, tensorrt: str, target: str, use_plugins: bool,
               profile: dict[str, Any], forms: dict[str, str] | None = None) -> str:
    """The cache key (hex sha256) of one engine build. ``forms``: ``{onnx name: "aot" |
    "python"}`` (:func:`seqdeploy.trt.aot.plugin_forms`); None means every op Python."""
    record = {
        "model_sha256": model_bytes_sha256,
        "plugins": sorted([PLUGIN_NAMESPACE, o.onnx_name, PLUGIN_VERSION, o.version,
                           *_form_of(o, forms)] for o in ops) if use_plugins else "onnx-function",
        "plugin_factory": [PLUGIN_FACTORY_VERSION, seqdeploy.__version__],
        "tensorrt": tensorrt,
        "target": target,
        "profile": profile,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _form_of(op, forms: dict[str, str] | None) -> list[str]:
    """An op's plugin form in the key; an AOT form also carries its entry's digest (the PTX
    is baked into the engine, so a changed kernel must not hit an old engine)."""
    form = (forms or {}).get(op.onnx_name, FORM_PYTHON)
    return [form, op.trt_aot.digest()] if form == FORM_AOT else [form]


class EngineCache:
    """One cache folder."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def plan_path(self, key: str) -> Path:
        return self.dir / f"{key}.plan"

    def record_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """The cached plan and its record, or None on a miss. A plan that does not match its
        recorded sha256 raises :class:`ArtifactError`."""
        plan, record = self.plan_path(key), self.record_path(key)
        if not record.is_file():
            return None
        try:
            meta = json.loads(record.read_text())
            want, size = meta["sha256"], meta["bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ArtifactError(f"{record}: corrupt engine-cache record; delete it to "
                                f"rebuild") from None
        if not plan.is_file():
            raise ArtifactError(f"{plan}: missing (recorded in {record.name}); delete the "
                                f"record to rebuild")
        if plan.stat().st_size != size or sha256_file(plan) != want:
            raise ArtifactError(f"{plan}: checksum mismatch (sha256 differs from "
                                f"{record.name}): edited or corrupt cached engine, refusing "
                                f"to load; delete it to rebuild")
        return plan.read_bytes(), meta

    def put(self, key: str, plan: bytes, report: dict[str, Any]) -> dict[str, Any]:
        digest = hashlib.sha256(plan).hexdigest()
        atomic_write(self.plan_path(key), lambda p: p.write_bytes(plan))
        meta = {"key": key, "sha256": digest, "bytes": len(plan), "build": report}
        atomic_write(self.record_path(key),
                     lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return meta

    def timing_cache(self, tensorrt: str, target: str) -> Path:
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in f"{tensorrt}-{target}")
        return self.dir / f"timing-{safe}.cache"
