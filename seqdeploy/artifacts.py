"""Artifacts on disk: ``exported/<arch>/<preset>/`` with a manifest of sha256 values.

Every write is atomic (temporary file in the same folder, then ``os.replace``), and the
manifest is rewritten last, so an interrupted run never leaves a file that later loads.
Reading a file through :meth:`Artifact.path` checks its sha256 against the manifest first.

Several runs may use one folder at once (``validate`` and ``bench`` in two shells): each
manifest update happens under an exclusive lock on the folder (``fcntl.flock`` on
``.manifest.lock``, where the OS has it) and merges into the manifest on disk, so no run
drops another's entries. A run whose folder was exported anew since it loaded it stops with
an error instead of recording its file in the new export's manifest.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from seqdeploy.errors import ArtifactError

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
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


@contextlib.contextmanager
def manifest_lock(directory: Path) -> Iterator[None]:
    """Hold the folder's manifest lock (exclusive, released on exit; a no-op where the OS has
    no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - Windows
        yield
        return
    path = Path(directory) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as exc:
        raise ArtifactError(f"cannot write {path.parent}: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
                    "export_id": uuid.uuid4().hex, "versions": versions(), "files": {},
                    **fields}
        artifact = cls(directory, manifest)
        # a fresh export invalidates whatever an older export left in the folder
        with manifest_lock(artifact.dir):
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

    def write(self, name: str, writer: Callable[[Path], None],
              records: dict[str, Any] | None = None, **info: Any) -> Path:
        """Atomically write ``name`` with ``writer(tmp_path)`` and record it in the manifest:
        ``files[name]`` (checksum, size and ``info``) and, for each ``section: value`` of
        ``records``, ``section[name] = value`` (e.g. an ONNX file's export summary). The
        update is merged under the folder's lock into the manifest on disk, which holds what
        other runs recorded meanwhile; the checksum is taken under the lock, so it is of the
        version the manifest ends with when two runs write one name."""
        path = self.dir / name
        atomic_write(path, writer)
        with manifest_lock(self.dir):
            manifest = self._manifest_on_disk()
            manifest["files"][name] = {"sha256": sha256_file(path),
                                       "bytes": path.stat().st_size, **info}
            for section, value in (records or {}).items():
                manifest.setdefault(section, {})[name] = value
            self.manifest = manifest
            self.save_manifest()
        return path

    def _manifest_on_disk(self) -> dict[str, Any]:
        """The manifest as on disk now (the caller holds the lock), after checking it is
        still this run's export; this run's copy if it is gone or damaged."""
        try:
            on_disk = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            on_disk = None
        if not isinstance(on_disk, dict) or not isinstance(on_disk.get("files"), dict):
            return copy.deepcopy(self.manifest)
        mine = (self.manifest.get("export_id"), self.manifest.get("created"))
        if (on_disk.get("export_id"), on_disk.get("created")) != mine:
            raise ArtifactError(f"{self.dir}: exported anew while this run used it (manifest "
                                f"created {on_disk.get('created')}); run again on the new export")
        return on_disk

    def write_json(self, name: str, data: Any) -> Path:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        return self.write(name, lambda p: p.write_text(text))

    def save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2) + "\n"
        atomic_write_text(self.dir / MANIFEST, text)
