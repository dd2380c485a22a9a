"""Artifacts on disk: ``exported/<arch>/<preset>/`` with a manifest of sha256 values.

Every write is atomic (temporary file in the same folder, then ``os.replace``), and the
manifest is rewritten last, so an interrupted run never leaves a file that later loads.
Reading a file through :meth:`Artifact.path` checks its sha256 against the manifest first.

An export is a transaction: it builds the new artifact in a version folder beside the old
one (``.<preset>.<export_id>/``) and only when that is complete points ``<preset>`` at it, by
atomically replacing a symbolic link (:meth:`Artifact.publish`). Until then the previous
artifact stays complete and loadable; afterwards none of its files (fp16 graphs, parity and
bench reports, engines) survive beside the new model.

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
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from seqdeploy.errors import ArtifactError

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
FORMAT_VERSION = 1
#: a version folder no link points to, older than this, is a crashed export's leftover
STALE_S = 3600


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
        #: where :meth:`publish` puts an export that :meth:`begin` started (else None)
        self.target: Path | None = None

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
    def begin(cls, directory: Path, arch: str, preset: str, config: dict[str, Any],
              **fields: Any) -> "Artifact":
        """Start an export transaction for ``directory``: a new, empty version folder beside
        it, where the caller writes every file; :meth:`publish` then swaps it in whole."""
        directory = Path(directory)
        _check_replaceable(directory)
        export_id = uuid.uuid4().hex
        version = directory.parent / f".{directory.name}.{export_id}"
        artifact = cls.create(version, arch, preset, config, export_id=export_id, **fields)
        artifact.target = directory
        return artifact

    def publish(self) -> None:
        """Point the export's target at this version folder, atomically (rename of a symbolic
        link over the old one), then remove the version it replaced. A real folder in the way
        (an artifact of an older seqdeploy, or a copy) is first moved aside as
        ``.<preset>.<id>.previous``, which :meth:`load` restores if the process dies before
        the link exists."""
        target: Path = self.target
        parent = target.parent
        old = _link_target(target)
        link = parent / f".{target.name}.link-{uuid.uuid4().hex}"
        os.symlink(self.dir.name, link)
        aside = None
        if target.exists() and not target.is_symlink():
            aside = parent / f".{target.name}.{uuid.uuid4().hex}.previous"
            os.rename(target, aside)
        os.replace(link, target)
        _fsync_dir(parent)
        self.dir = target
        for leftover in (aside, old):
            if leftover is not None and leftover.name != _link_name(target):
                shutil.rmtree(leftover, ignore_errors=True)
        _sweep(target)

    def abandon(self) -> None:
        """Remove an unpublished version folder (an export that failed or was interrupted)."""
        if self.target is not None and self.dir != self.target:
            shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "Artifact":
        directory = Path(directory)
        _restore(directory)
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

    def check_io(self, io: dict[str, Any]) -> None:
        """Refuse an artifact whose recorded inputs and outputs are not the architecture's
        (exported by another version of its plugin): running it would feed the wrong tensors."""
        recorded = self.manifest.get("io")
        if recorded != io:
            raise ArtifactError(f"{self.dir}: its inputs and outputs no longer match the "
                                f"{self.manifest['arch']} plugin's (exported by another "
                                f"version); re-export it")

    def write_json(self, name: str, data: Any) -> Path:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        return self.write(name, lambda p: p.write_text(text))

    def save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2) + "\n"
        atomic_write_text(self.dir / MANIFEST, text)


def _link_name(target: Path) -> str | None:
    return os.readlink(target) if target.is_symlink() else None


def _link_target(target: Path) -> Path | None:
    name = _link_name(target)
    return None if name is None else target.parent / name


def _check_replaceable(target: Path) -> None:
    """An export may replace an artifact, never a folder of the user's."""
    if target.is_symlink() or not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not an artifact folder; move it away")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(f"{target} is a folder that holds no seqdeploy artifact; refusing "
                            f"to replace it (move it away, or export with another --out)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _restore(target: Path) -> None:
    """Finish what a killed :meth:`Artifact.publish` left: a folder moved aside and no link
    in its place is the previous artifact, complete; it goes back."""
    if target.exists() or target.is_symlink():
        return
    aside = sorted(target.parent.glob(f".{target.name}.*.previous"), key=lambda p: p.stat().st_mtime)
    if aside:
        try:
            os.rename(aside[-1], target)
        except OSError:
            pass


def _sweep(target: Path) -> None:
    """Remove version folders of crashed exports: not the link's target, and old."""
    current = _link_name(target)
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.name == current or leftover.name.endswith(".previous"):
            continue
        try:
            if now - leftover.lstat().st_mtime > STALE_S:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
        except OSError:
            pass
