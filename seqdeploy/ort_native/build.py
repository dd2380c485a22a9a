"""Build the ORT op library: ``libseqdeploy_ort.so`` with every registered op's kernels.

Steps (:func:`build_library`):

1. every registered op with an :class:`~seqdeploy.ort_native.OrtKernel` in ``extra["ort"]``;
2. ONNX Runtime's C API headers (:func:`ort_headers`): ``$SEQDEPLOY_ORT_INCLUDE``, a system
   ``libonnxruntime-dev``, or Debian trixie's ``libonnxruntime-dev`` package (1.21, headers
   only) fetched with a private apt configuration into the cache; nothing is vendored;
3. the ops' Triton kernels compiled to PTX for sm_80 and sm_90 (:mod:`.aot`, a subprocess);
4. a generated kernel table and an assembler file embedding the PTX (``.incbin``);
5. ``g++ -shared`` of ``library.cc`` and the ops' sources. The library never links
   libonnxruntime (``ORT_API_MANUAL_INIT``) nor CUDA (the driver is dlopen'ed at run time).

The result is cached in ``~/.cache/seqdeploy/ort-ops/<key>/`` (``$SEQDEPLOY_CACHE`` moves the
root), keyed by the library's and the ops' sources, the Triton kernels' modules and variants,
the Triton, compiler and ORT header versions. ``$SEQDEPLOY_ORT_LIBRARY`` names a prebuilt
library to use instead (e.g. one built on the CI machine and carried to a GPU host).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from seqdeploy.errors import SeqdeployError
from seqdeploy.ort_native import EXTRA_KEY, OrtKernel

if TYPE_CHECKING:
    from seqdeploy.plugins import Registry

HERE = Path(__file__).parent
LIBRARY = "libseqdeploy_ort.so"
ARCHS = (80, 90)
#: the Debian package whose headers the library is compiled against
HEADER_PACKAGE = "libonnxruntime-dev"
TRIXIE_SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
HOW_TO_GET_HEADERS = (
    "get ONNX Runtime's C API headers: `apt-get install libonnxruntime-dev` (Debian trixie or "
    "later), or set SEQDEPLOY_ORT_INCLUDE to a folder holding onnxruntime_c_api.h, or run "
    "`seqdeploy build-ort-ops` once with network access (it fetches the Debian package)")


class BuildError(SeqdeployError):
    """The library cannot be built here; the message says what is missing and how to get it."""


def cache_root() -> Path:
    base = os.environ.get("SEQDEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqdeploy")
    return Path(base)


def ort_ops(registry: "Registry") -> dict[str, OrtKernel]:
    """ONNX op type -> its OrtKernel, for every registered op that has one."""
    return {op.onnx_name: op.extra[EXTRA_KEY] for op in registry.ops.values()
            if isinstance(op.extra.get(EXTRA_KEY), OrtKernel)}


# ---- headers ------------------------------------------------------------------------------------

def _has_headers(path: Path) -> bool:
    return (path / "onnxruntime_c_api.h").is_file() and (path / "onnxruntime_cxx_api.h").is_file()


def ort_headers(fetch: bool = True) -> Path:
    """The folder holding ``onnxruntime_c_api.h`` (see the module docstring for the order)."""
    env = os.environ.get("SEQDEPLOY_ORT_INCLUDE")
    if env:
        if not _has_headers(Path(env)):
            raise BuildError(f"SEQDEPLOY_ORT_INCLUDE={env} holds no onnxruntime_c_api.h and "
                             "onnxruntime_cxx_api.h")
        return Path(env)
    for candidate in (Path("/usr/include/onnxruntime"),
                      cache_root() / "ort-headers" / "usr" / "include" / "onnxruntime"):
        if _has_headers(candidate):
            return candidate
    if not fetch:
        raise BuildError(f"no ONNX Runtime C API headers: {HOW_TO_GET_HEADERS}")
    return _fetch_headers(cache_root() / "ort-headers")


def _fetch_headers(dest: Path) -> Path:
    """Download Debian trixie's libonnxruntime-dev with a private apt configuration (the
    system's sources and package state are never touched) and extract it into ``dest``."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise BuildError(f"no ONNX Runtime C API headers and no apt-get to fetch them: "
                         f"{HOW_TO_GET_HEADERS}")
    with tempfile.TemporaryDirectory(prefix="seqdeploy-apt-") as tmp:
        root = Path(tmp)
        for d in ("etc", "lists/partial", "cache/archives/partial"):
            (root / d).mkdir(parents=True)
        (root / "etc" / "trixie.sources").write_text(TRIXIE_SOURCES)
        options = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={root}/etc",
                   "-o", f"Dir::State::Lists={root}/lists", "-o", f"Dir::Cache={root}/cache",
                   "-o", "Dir::State::Status=/dev/null", "-o", "Debug::NoLocking=1",
                   "-o", "APT::Sandbox::User=root", "-qq"]
        for cmd in (["apt-get", *options, "update"], ["apt-get", *options, "download", HEADER_PACKAGE]):
            done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise BuildError(f"fetching {HEADER_PACKAGE} from Debian trixie failed ({last}): "
                                 f"{HOW_TO_GET_HEADERS}")
        debs = sorted(root.glob(f"{HEADER_PACKAGE}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get downloaded no {HEADER_PACKAGE}: {HOW_TO_GET_HEADERS}")
        staging = Path(tempfile.mkdtemp(prefix="ort-headers-", dir=dest.parent
                                        if dest.parent.exists() else _mkdir(dest.parent)))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        (staging / "PACKAGE").write_text(debs[0].name + "\n")
        if dest.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, dest)
    include = dest / "usr" / "include" / "onnxruntime"
    if not _has_headers(include):
        raise BuildError(f"{HEADER_PACKAGE} held no onnxruntime_c_api.h: {HOW_TO_GET_HEADERS}")
    return include


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def header_version(include: Path) -> str:
    """``ORT_API_VERSION`` of the headers (21 for ONNX Runtime 1.21)."""
    m = re.search(r"#define ORT_API_VERSION (\d+)", (include / "onnxruntime_c_api.h").read_text())
    return m.group(1) if m else "?"


# ---- the build ----------------------------------------------------------------------------------

def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if not path:
        raise BuildError(f"no C++ compiler ({cxx} not found): install one (`apt-get install "
                         "g++`) or set CXX")
    return path


def _package_dir(package: str) -> Path:
    return Path(importlib.import_module(package).__file__).parent


def _jobs(kernels: dict[str, OrtKernel]) -> list[dict]:
    """One AOT compile per (Triton kernel, dtype, variant, architecture)."""
    jobs = []
    for spec in kernels.values():
        for aot in spec.triton:
            for dtype in aot.dtypes:
                signature = {k: v.replace("*T", "*" + dtype) for k, v in aot.signature.items()}
                for variant, (constexprs, num_warps) in aot.variants(dtype).items():
                    for arch in (ARCHS if aot.archs is None else aot.archs):
                        jobs.append({"name": f"{aot.name}_{dtype}_{variant}", "kernel": aot.kernel,
                                     "signature": signature, "constexprs": constexprs,
                                     "num_warps": num_warps, "arch": arch})
    return jobs


def _sources(kernels: dict[str, OrtKernel]) -> list[Path]:
    paths = []
    for spec in kernels.values():
        for src in spec.sources:
            path = _package_dir(spec.package) / src
            if not path.is_file():
                raise BuildError(f"{spec.package}: ORT kernel source {src} not found at {path}")
            paths.append(path)
    return paths


def _key(kernels, jobs, sources, include, cxx) -> str:
    import triton

    h = hashlib.sha256()
    for path in [HERE / "seqdeploy_ort.h", HERE / "cuda_launch_abi.h", HERE / "library.cc",
                 HERE / "build.py", HERE / "aot.py", *sources]:
        h.update(path.name.encode() + path.read_bytes())
    # every Python file of each kernel's package: a kernel's jit helpers (and the kernel
    # itself, re-exported) may live in sibling modules
    folders = {Path(importlib.import_module(j["kernel"].split(":")[0]).__file__).parent
               for j in jobs}
    for path in sorted(f for folder in folders for f in folder.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    h.update(json.dumps(jobs, sort_keys=True).encode())
    h.update(json.dumps({k: v.kernel_class for k, v in kernels.items()}, sort_keys=True).encode())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(f"{triton.__version__}|{header_version(include)}|{version}".encode())
    return h.hexdigest()[:20]


def _generated(facts: list[dict], kernels: dict[str, OrtKernel]) -> tuple[str, str]:
    """The kernel table (C++) and the assembler file embedding each PTX."""
    asm = [".section .rodata"]
    cpp = ["// generated by seqdeploy/ort_native/build.py", "#include <cstddef>"]
    by_name: dict[str, list[tuple[int, dict]]] = {}
    for i, f in enumerate(facts):
        sym = f"seqdeploy_ptx_{i}"
        asm += [f".global {sym}", f".hidden {sym}", f".type {sym}, @object", ".balign 16",
                f"{sym}:", f'.incbin "{f["ptx"]}"', ".byte 0"]
        cpp.append(f'extern "C" const char {sym}[];')
        by_name.setdefault(f["name"], []).append((i, f))
    asm.append('.section .note.GNU-stack,"",@progbits')
    rows = []
    for n, (name, entries) in enumerate(by_name.items()):
        images = ", ".join(f"{{{f['arch']}, seqdeploy_ptx_{i}}}" for i, f in entries)
        cpp.append(f"static const seqdeploy::TritonImage kImages{n}[] = {{{images}}};")
        f = entries[0][1]
        for _, other in entries:   # one launch recipe for every architecture's PTX
            if (other["entry"], other["num_warps"], other["n_args"], other["n_params"]) != \
                    (f["entry"], f["num_warps"], f["n_args"], f["n_params"]):
                raise BuildError(f"{name}: its PTX differs in signature between architectures")
        shared = max(o["shared"] for _, o in entries)
        rows.append(f'  {{"{name}", "{f["entry"]}", {f["num_warps"]}, {shared}, {f["n_args"]}, '
                    f'{f["n_params"]}, kImages{n}, {len(entries)}}},')
    cpp.append("static const seqdeploy::TritonKernel kKernels[] = {")
    cpp += rows or ['  {"", "", 0, 0, 0, 0, nullptr, 0},']
    cpp.append("};")
    classes = [spec.kernel_class for spec in kernels.values()]
    cpp += [f"void seqdeploy_register_{c}(seqdeploy::Registrar&);" for c in classes]
    cpp.append("static void (*const kRegister[])(seqdeploy::Registrar&) = {" +
               ", ".join(f"&seqdeploy_register_{c}" for c in classes) + "};")
    return "\n".join(cpp) + "\n", "\n".join(asm) + "\n"


def _compile_ptx(jobs: list[dict], work: Path) -> list[dict]:
    """Run :mod:`.aot` on ``jobs``, one process per architecture, side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for arch in ARCHS:
        part = work / f"sm{arch}"
        part.mkdir()
        (part / "jobs.json").write_text(json.dumps([j for j in jobs if j["arch"] == arch]))
        procs.append((part, subprocess.Popen(
            [sys.executable, "-m", "seqdeploy.ort_native.aot", str(part / "jobs.json"), str(part)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)))
    facts, failure = [], None
    for part, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0 and failure is None:
            failure = (err.strip().splitlines() or ["?"])[-1]
        elif proc.returncode == 0:
            facts += json.loads((part / "kernels.json").read_text())
    if failure:
        raise BuildError(f"compiling the Triton kernels for the ORT library failed: {failure}")
    return facts


def build_library(registry: "Registry", force: bool = False,
                  echo: Callable[[str], None] = lambda _: None) -> Path:
    """The path of the library for the registered ops, building it if it is not cached."""
    prebuilt = os.environ.get("SEQDEPLOY_ORT_LIBRARY")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise BuildError(f"SEQDEPLOY_ORT_LIBRARY={prebuilt} does not exist")
        return Path(prebuilt)
    kernels = ort_ops(registry)
    if not kernels:
        raise BuildError("no registered op has an ORT kernel (CustomOp.extra['ort'])")
    cxx = compiler()
    include = ort_headers()
    jobs, sources = _jobs(kernels), _sources(kernels)
    out_dir = cache_root() / "ort-ops" / _key(kernels, jobs, sources, include, cxx)
    library = out_dir / LIBRARY
    if library.is_file() and not force:
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out_dir))
    try:
        echo(f"compiling {len(jobs)} Triton kernels to PTX (sm_{', sm_'.join(map(str, ARCHS))})")
        facts = _compile_ptx(jobs, work)
        table, asm = _generated(facts, kernels)
        (work / "seqdeploy_ort_generated.inc").write_text(table)
        (work / "kernels.S").write_text(asm)
        echo(f"compiling {len(sources) + 1} C++ sources with {cxx}")
        cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
               "-Wall", "-Wno-unused-function", f"-I{include}", f"-I{HERE}", f"-I{work}",
               str(HERE / "library.cc"), *map(str, sources), str(work / "kernels.S"),
               "-o", str(work / LIBRARY), "-ldl", "-Wl,--no-undefined"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or \
                done.stderr.strip().splitlines() or ["?"]
            raise BuildError(f"{Path(cxx).name} failed to build the ORT library: {errors[0]}")
        os.replace(work / LIBRARY, library)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return library
