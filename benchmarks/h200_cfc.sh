#!/usr/bin/env bash
# The GPU evidence for `cfc`, as run on the H200 through the device tool (see README). STAGES
# picks what runs (default: all, in this order), so a lease can split them over calls:
#   tests   the cfc GPU tests (TESTS overrides the files)
#   bench   benchmarks/cfc_scan.py: kernel vs seed vs torch.compile vs cuDNN at the seed's points
#   stream  benchmarks/stream_latency.py cfc seed: the torch engine's streaming step at B=1
#   run     seqdeploy run cfc (preset seed): export, fp16, validate, bench
# Outputs land in $OUT (default /tmp/seqdeploy-out).
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for stage in ${STAGES:-tests bench stream run}; do
    echo "== $stage $(date -u +%FT%TZ)"
    case $stage in
        tests)  python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cfc_scan.py tests/test_launch.py tests/test_streaming.py tests/test_value_flags.py} 2>&1 \
                    | tee "$O/pytest_gpu.txt" | tail -15 ;;
        bench)  python3 benchmarks/cfc_scan.py --json "$O/cfc_scan.json" 2>&1 | grep -v Warning | tee "$O/cfc_scan.txt" | sed -n '/^ms per call/,$p' ;;
        stream) python3 benchmarks/stream_latency.py cfc seed --steps 1000 --json "$O/stream.json" 2>&1 | tee "$O/stream.txt" | tail -6 ;;
        run)    seqdeploy --out /tmp/seqdeploy-ex run cfc --preset seed 2>&1 | grep -v "^  \[" | tee "$O/run_cfc.txt" | tail -30 ;;
        *)      echo "unknown stage $stage"; exit 2 ;;
    esac
done
