#!/usr/bin/env bash
# The GPU evidence for `ten`, as run on the H200 through the device tool (see README):
# GPU tests, the eigen_scan kernel benchmark, and `seqdeploy run ten` (base preset, fp16
# bench of torch-ref / torch / ort with the CUDA EP when onnxruntime-gpu is importable).
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
seqdeploy doctor | tee "$O/doctor.txt"
python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests} 2>&1 | tail -8 | tee "$O/pytest_gpu.txt"
python3 benchmarks/eigen_scan.py --json "$O/eigen_scan.json" 2>&1 | grep -v Warning | tee "$O/eigen_scan.txt"
seqdeploy --out /tmp/seqdeploy-ex run ten --plot 2>&1 | grep -v "^  \[" | tee "$O/run_ten.txt"
cp /tmp/seqdeploy-ex/ten/base/parity.json /tmp/seqdeploy-ex/ten/base/bench.json \
   /tmp/seqdeploy-ex/ten/base/bench.png "$O/" 2>/dev/null
