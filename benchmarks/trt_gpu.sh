#!/usr/bin/env bash
# GPU evidence for the trt engine (issue 17), run by the lead on the device machine after
# `python3 -m pip install -q --no-deps --no-build-isolation -e .`; installs nothing from the
# network. Results go under $OUT:
#   trt_doctor.txt   seqdeploy doctor (TensorRT flavour, whether this GPU runs its engines)
#   trt_pytest.txt   tests/test_trt.py: each plugin's enqueue called as TensorRT calls it
#                    (PluginTensorDesc objects, raw device pointers, a non-default stream) at
#                    the validation shapes, plus the engine builds
#   trt_bench.txt    `seqdeploy bench ten --engine trt` (must exit non-zero in one line on a
#                    GPU TensorRT-RTX cannot run on, naming its compute capability)
# TensorRT-RTX is not on the device machine: carry it as parts (benchmarks/trt_rtx_parts.sh);
# without it the trt tests skip with that reason and bench says tensorrt is not installed.
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
if ! python3 -c "import tensorrt" 2>/dev/null && [ -f .trt/SHA256SUMS ]; then
    mkdir -p /tmp/trtp
    cp .trt/part0* /tmp/trtp/ 2>/dev/null
    cat /tmp/trtp/part0* > /tmp/trtp/libs.whl
    if (cd /tmp/trtp && sha256sum -c "$OLDPWD/.trt/SHA256SUMS" >/dev/null); then
        mkdir -p /tmp/trtwhl
        cp /tmp/trtp/libs.whl /tmp/trtwhl/tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
        cp .trt/bindings.whl /tmp/trtwhl/tensorrt_rtx_cu13_bindings-1.7.1.116-cp312-none-manylinux_2_28_x86_64.whl
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/trtsite /tmp/trtwhl/*.whl \
            && export PYTHONPATH=/tmp/trtsite${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "trt_gpu: the carried TensorRT-RTX parts do not reassemble (sha256 mismatch): carry part00 and part01 again" | tee "$O/trt_install.txt"
    fi
fi
python3 -c "import tensorrt_rtx_bindings as t; print('tensorrt-rtx', t.__version__)" 2>&1 | tail -1 | tee "$O/trt_install.txt"
seqdeploy doctor 2>&1 | tee "$O/trt_doctor.txt"
# the GPU's part of tests/test_trt.py (engine builds are CI's; TRT_PYTEST_K="" runs them all).
# Verbose, so each test's verdict is on its own line as it finishes: on an H100 (2026-12-07)
# 200 s ended after 3 tests, with no summary (exporting every tiny model and the float64
# references at the validation cases, T = 4096 among them, run on the host). Give it a call.
K=${TRT_PYTEST_K-enqueue or doctor or runnable_gpu}
timeout "${TRT_PYTEST_S:-480}" python3 -m pytest -v -p no:cacheprovider -rs -rf --tb=short --durations=10 \
  ${K:+-k "$K"} tests/test_trt.py 2>&1 | grep -v "^$" | tee "$O/trt_pytest.txt" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|slowest|s call|s setup"
EX=/tmp/trt-ex
seqdeploy --out $EX export ten --preset tiny >/dev/null 2>&1
seqdeploy --out $EX bench ten --preset tiny --engine trt > "$O/trt_bench.txt" 2>&1
rc=$?
echo "exit status $rc" >> "$O/trt_bench.txt"
cat "$O/trt_bench.txt"
