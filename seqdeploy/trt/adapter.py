"""One adapter for both TensorRTs: full ``tensorrt`` (>= 10.9) and TensorRT-RTX (>= 1.7).

Both ship the same ``nvinfer1`` Python API (builder, ONNX parser, ``IPluginV3``, runtime), so
the rest of :mod:`seqdeploy.trt` is written once against the module :func:`load` returns.

TensorRT-RTX's wheels name their module ``tensorrt_rtx_bindings`` (``tensorrt_rtx`` in other
packagings) and ship only ``libtensorrt_rtx.so.1``; the ONNX parser ``dlopen``\\ s the
unversioned ``libtensorrt_rtx.so`` when it adds a plugin layer, and without it the process
dies (``terminate called without an active exception``) instead of raising. :func:`load`
therefore puts the symlink beside the library before anything is parsed, or refuses in one
line naming the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from seqdeploy.errors import EngineUnavailable

#: (import name, flavour, minimum version), tried in this order: full TensorRT first, since
#: it runs on every GPU it was built for and offers the AOT plugin form
CANDIDATES = (("tensorrt", "tensorrt", (10, 9)),
              ("tensorrt_rtx", "tensorrt-rtx", (1, 7)),
              ("tensorrt_rtx_bindings", "tensorrt-rtx", (1, 7)))

#: compute capabilities TensorRT-RTX 1.7 executes engines on (its own error message on an
#: H100 lists them: "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1")
RTX_RUNS_ON = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT module and what it is."""

    trt: ModuleType
    flavour: str           # "tensorrt" or "tensorrt-rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def has_aot_plugins(self) -> bool:
        """Whether this TensorRT offers ``tensorrt.plugin`` (AOT plugins: no Python at run
        time). TensorRT-RTX has no such API."""
        if self.is_rtx:
            return False
        try:
            importlib.import_module(f"{self.trt.__name__}.plugin")
        except ImportError:
            return False
        return True

    def describe(self) -> str:
        return f"{self.flavour} {self.version}"

    def logger(self):
        """A TensorRT logger: everything with ``SEQDEPLOY_TRT_VERBOSE=1``; else errors, except
        on a machine without a CUDA driver, where a CPU build's harmless complaints about the
        missing driver would read like failures (a failed build still raises)."""
        trt = self.trt
        if os.environ.get("SEQDEPLOY_TRT_VERBOSE"):
            return trt.Logger(trt.Logger.VERBOSE)
        import torch

        quiet = trt.Logger.ERROR if torch.cuda.is_available() else trt.Logger.INTERNAL_ERROR
        return trt.Logger(quiet)

    def runs_on(self, capability: tuple[int, int] | None) -> tuple[bool, str]:
        """Whether engines of this TensorRT execute on a GPU of ``capability`` (None: no
        GPU), with the reason when not."""
        if capability is None:
            return False, "no CUDA device"
        if self.is_rtx and tuple(capability) not in RTX_RUNS_ON:
            known = " ".join(f"{a}.{b}" for a, b in RTX_RUNS_ON)
            return False, (f"TensorRT-RTX {self.version} cannot run engines on compute capability "
                           f"{capability[0]}.{capability[1]} (it runs on {known})")
        return True, ""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_LOADED: list[TensorRT] = []


def load(prefer: str | None = None) -> TensorRT:
    """Import whichever TensorRT is installed (``prefer``, or ``$SEQDEPLOY_TENSORRT``:
    ``"tensorrt"`` or ``"tensorrt-rtx"`` to pick one when both are), after making TensorRT-RTX's library name
    loadable. Raises :class:`EngineUnavailable` in one line when none can be used."""
    prefer = prefer or os.environ.get("SEQDEPLOY_TENSORRT") or None
    for loaded in _LOADED:
        if prefer in (None, loaded.flavour):
            return loaded
    too_old = []
    for module, flavour, minimum in CANDIDATES:
        if prefer not in (None, flavour):
            continue
        if flavour == "tensorrt-rtx":
            ensure_rtx_library_link()
        try:
            trt = importlib.import_module(module)
        except ImportError:
            continue
        except Exception as exc:   # e.g. a stub wheel that fails at import: try the next
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            too_old.append(f"{module} fails to import ({type(exc).__name__}: {first})")
            continue
        version = str(getattr(trt, "__version__", "0"))
        if _version_tuple(version) < minimum:
            too_old.append(f"{module} {version} (needs >= {'.'.join(map(str, minimum))})")
            continue
        found = TensorRT(trt, flavour, version)
        _LOADED.append(found)
        return found
    if too_old:
        raise EngineUnavailable(f"no usable TensorRT: {'; '.join(too_old)}")
    raise EngineUnavailable("tensorrt is not installed (pip install 'seqdeploy[tensorrt]' for "
                            "full TensorRT, or 'seqdeploy[tensorrt-rtx]' for TensorRT-RTX)")


def rtx_library_dir() -> Path | None:
    """The folder of ``libtensorrt_rtx.so.1`` from the ``tensorrt_rtx_libs`` wheel, found
    without importing it (importing loads the library)."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_rtx_library_link() -> None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` beside the library when it is
    missing (TensorRT-RTX's parser ``dlopen``\\ s that name and aborts the process when it is
    absent). A folder we cannot write is a one-line :class:`EngineUnavailable`."""
    folder = rtx_library_dir()
    if folder is None:
        return
    target = folder / "libtensorrt_rtx.so.1"
    link = folder / "libtensorrt_rtx.so"
    if not target.exists() or link.exists():
        return
    try:
        os.symlink(target.name, link)
    except FileExistsError:       # another process made it meanwhile
        pass
    except OSError as exc:
        raise EngineUnavailable(
            f"TensorRT-RTX needs {link} -> {target.name} (its ONNX parser loads that name) and "
            f"{folder} is not writable ({exc.strerror}); create it with: "
            f"ln -s {target.name} {link}") from None


def import_error() -> str | None:
    """Why no TensorRT can be used here, or None when one can (for ``doctor``)."""
    try:
        load()
    except EngineUnavailable as exc:
        return str(exc)
    return None
