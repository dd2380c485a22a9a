#!/usr/bin/env bash
# Install seqdeploy and what it needs into the current Python, without ever letting pip pick
# a torch build: a CPU machine gets the pinned torch 2.13.0, a GPU machine keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    pip_install torch==2.13.0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # no GPU: Triton kernels run in Triton's interpreter, which needs triton >= 3.9
    # (3.6's interpreter breaks under numpy >= 2.4)
    "$PY" -c "import triton, sys; v = tuple(map(int, triton.__version__.split('.')[:2])); sys.exit(0 if v >= (3, 9) else 1)" 2>/dev/null \
        || pip_install "triton>=3.9"
fi
# an editable install builds with the setuptools already here (the GPU machine is offline)
"$PY" -c "import setuptools, sys; sys.exit(0 if int(setuptools.__version__.split('.')[0]) >= 64 else 1)" 2>/dev/null \
    || pip_install "setuptools>=64"
pip_install --no-build-isolation -e ".[test]"
# TensorRT-RTX builds real TensorRT engines without a GPU, so CI tests the trt engine's build
# half with it (wheels exist for cp311/cp312). Not fatal: offline (the GPU machine) the trt
# tests skip, saying why.
if ! "$PY" -c "import tensorrt" 2>/dev/null && ! "$PY" -c "import tensorrt_rtx_bindings" 2>/dev/null; then
    pip_install --retries 1 --timeout 20 "tensorrt-rtx-cu13-bindings==1.7.1.116" "tensorrt-rtx-cu13-libs==1.7.1.116" \
        || echo "setup: TensorRT-RTX could not be installed (no network, or no wheel for this Python): the trt engine tests will skip" >&2
fi
