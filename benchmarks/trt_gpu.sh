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
# the GPU's part of tests/test_trt.py (engine builds are CI's): one pytest process per test
# (precision, architecture), in parallel, each verdict on its own line. Each process exports
# every tiny model and JIT-compiles its architecture's kernels, and the float64 references at
# the validation cases (T = 4096 among them) run step by step: on an H200 (2026-12-07), with
# one process per architecture and 300 s each, 9 of 10 passed and dlinoss fp16 ran out of
# time compiling. TRT_PYTEST_K="" runs the whole file in one process.
S=${TRT_PYTEST_S:-330}
run_part() {   # $1: label, then pytest selection arguments
  local label=$1; shift
  timeout "$S" python3 -m pytest -v -p no:cacheprovider -rs -rf --tb=short --durations=5 \
    "$@" > "/tmp/trt_pytest_$label.txt" 2>&1
  echo "exit status $?" >> "/tmp/trt_pytest_$label.txt"
}
if [ -z "${TRT_PYTEST_K+set}" ]; then
  IDS=$(python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_trt.py 2>/dev/null | grep "::test_plugin_enqueue")
  for id in $IDS; do     # one process per (precision, architecture)
    run_part "$(echo "$id" | sed -E 's/.*\[(.*)\]$/\1/')" "$id" &
  done
  run_part other -k "doctor or runnable_gpu" tests/test_trt.py &
  wait
else
  run_part all ${TRT_PYTEST_K:+-k "$TRT_PYTEST_K"} tests/test_trt.py
fi
cat /tmp/trt_pytest_*.txt | grep -v "^$" > "$O/trt_pytest.txt"
grep -hE "PASS|FAIL|ERROR|SKIP|passed|failed|exit status|s call|s setup" /tmp/trt_pytest_*.txt
EX=/tmp/trt-ex
seqdeploy --out $EX export ten --preset tiny >/dev/null 2>&1
seqdeploy --out $EX bench ten --preset tiny --engine trt > "$O/trt_bench.txt" 2>&1
rc=$?
echo "exit status $rc" >> "$O/trt_bench.txt"
cat "$O/trt_bench.txt"
