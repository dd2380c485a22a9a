"""Shared fixtures. Without a GPU, Triton kernels run through Triton's interpreter, which
must be switched on before ``triton`` is first imported."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))   # a broken plugin module
# the third-party plugin package, importable by name (tests also pip-install it)
sys.path.insert(0, str(HERE / "fixtures" / "toy_plugin"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch):
    """Tests start from the installed plugins only; each may set its own."""
    monkeypatch.delenv("SEQDEPLOY_PLUGINS", raising=False)
    monkeypatch.delenv("SEQDEPLOY_DISABLE_PLUGIN_AUTOLOAD", raising=False)


@pytest.fixture
def registry():
    from seqdeploy.plugins import load_registry

    return load_registry()


def compile_and_trace(fn, *args):
    """Run ``torch.compile(fn, fullgraph=True)`` on ``args`` with a backend that records the
    targets of the graph's calls: ``(output, targets)``."""
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True)(*args), seen


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from seqdeploy.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def ten_artifact(tmp_path_factory):
    """One exported + FP16-optimised ``ten/tiny`` artifact per session (tests copy it
    before changing anything)."""
    from seqdeploy import pipeline
    from seqdeploy.plugins import load_registry

    root = tmp_path_factory.mktemp("exported")
    registry = load_registry()
    artifact = pipeline.export(registry, "ten", "tiny", root)
    pipeline.optimize_fp16(registry, artifact)
    return root


@pytest.fixture
def ten_copy(ten_artifact, tmp_path):
    """A private copy of the session artifact root, safe to edit."""
    import shutil

    dst = tmp_path / "exported"
    shutil.copytree(ten_artifact, dst)
    return dst


#: IR version of the ONNX models tests build by hand: onnx 1.23 writes 14 by default, which
#: onnxruntime 1.30 (the GPU machine's) refuses; torch's exporter writes 10
TEST_IR_VERSION = 10


def make_model(graph, **kwargs):
    """``onnx.helper.make_model`` at :data:`TEST_IR_VERSION`, which every onnxruntime we run
    loads."""
    from onnx import helper

    return helper.make_model(graph, ir_version=TEST_IR_VERSION, **kwargs)
