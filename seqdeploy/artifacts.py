"""Artifacts on disk: ``exported/<arch>/<preset>/`` with a manifest of sha256 values.

Every write is atomic (temporary file in the same folder, then ``os.replace``), and the
manifest is rewritten last, so an interrupted run never leaves a file that later loads.
Reading a file through :meth:`Artifact.path` checks its sha256 against the manifest first.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

from seqdeploy.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)``, then move the finished file into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; artifacts are shared files
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def versions() -> dict[str, str]:
    import onnx
    import torch

    import seqdeploy

    return {"seqdeploy": seqdeploy.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def default_dir(root: Path | str, arch: str, preset: str) -> Path:
    return Path(root) / arch / preset


class Artifact:
    """One exported model folder and its manifest."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.dir = Path(directory)
        self.manifest = manifest

    # -- creation and loading -------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, arch: str, preset: str, config: dict[str, Any],
               **fields: Any) -> "Artifact":
        manifest = {"format": FORMAT_VERSION, "arch": arch, "preset": preset, "config": config,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": versions(), "files": {}, **fields}
        artifact = cls(directory, manifest)
        # a fresh export invalidates whatever an older export left in the folder
        artifact.save_manifest()
        return artifact

    @classmethod
    def load(cls, directory: Path) -> "Artifact":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"no artifact at {directory} ({MANIFEST} missing); "
                                f"run `seqdeploy export` first")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: corrupt manifest ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{path}: corrupt manifest (not a JSON object)")
        for key, kind in (("arch", str), ("preset", str), ("config", dict), ("files", dict)):
            if not isinstance(manifest.get(key), kind):
                raise ArtifactError(f"{path}: corrupt manifest ({key!r} missing or not a {kind.__name__})")
        for name, entry in manifest["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("bytes"), int)):
                raise ArtifactError(f"{path}: corrupt manifest (entry for {name!r})")
        if manifest.get("format") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: manifest format {manifest.get('format')!r} is not "
                                f"{FORMAT_VERSION}; re-export")
        return cls(directory, manifest)

    # -- files ------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def path(self, name: str, verify: bool = True) -> Path:
        """The path of a recorded file, after checking it exists and matches its sha256."""
        entry = self.manifest["files"].get(name)
        path = self.dir / name
        if entry is None:
            raise ArtifactError(f"{self.dir}: {name} is not part of this artifact; "
                                f"run the stage that makes it first")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (recorded in the manifest)")
        if verify:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ArtifactError(f"{path}: checksum mismatch ({size} bytes, manifest says "
                                    f"{entry['bytes']}): truncated or edited, refusing to load")
            if sha256_file(path) != entry["sha256"]:
                raise ArtifactError(f"{path}: checksum mismatch (sha256 differs from the "
                                    f"manifest): edited or corrupt, refusing to load")
        return path

    def write(self, name: str, writer: Callable[[Path], None], **info: Any) -> Path:
        """Atomically write ``name`` with ``writer(tmp_path)`` and record it in the manifest."""
        path = self.dir / name
        atomic_write(path, writer)
        self.manifest["files"][name] = {"sha256": sha256_file(path),
                                        "bytes": path.stat().st_size, **info}
        self.save_manifest()
        return path

    def write_json(self, name: str, data: Any) -> Path:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        return self.write(name, lambda p: p.write_text(text))

    def save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2) + "\n"
        atomic_write_text(self.dir / MANIFEST, text)
