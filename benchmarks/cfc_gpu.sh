#!/usr/bin/env bash
# GPU evidence for the cfc kernels' refactor (issue 21), under 4 minutes on an H100.
#
# Needs the editable install of this tree (python3 -m pip install -q --no-deps
# --no-build-isolation -e .) and BEFORE_DIR: an extracted copy of the tree before the
# refactor (main just before this branch was merged: e4bab40 when written), e.g. from the
# repository root of a checkout:
#     mkdir -p cfc-before && git archive e4bab40 | tar -x -C cfc-before
#     BEFORE_DIR=cfc-before bash benchmarks/cfc_gpu.sh
# (an untracked, not ignored folder travels to the device machine with the tree). Where the
# tree has its .git, BEFORE_COMMIT (default e4bab40) is extracted to /tmp/cfc-before instead.
#
# 1. benchmarks/cfc_ab.py before, after, before, after (the two rounds of each side bound the
#    noise): eager and CUDA-graph time of the op at the seed's four points (fp16) and one
#    streaming step; each "after" round checks its outputs (fp32/fp16/bf16, seed points and
#    odd shapes) bit for bit against the first "before" round's.
# 2. the cfc and launch GPU tests.
# STAGES="ab tests" (the default) picks the stages, so that a lease can split them over calls.
# Outputs: $OUT/cfc/{versions.txt, ab.txt, before1/, after1/, ..., summary.txt, pytest_gpu.txt}
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}/cfc
mkdir -p "$O"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$O/versions.txt"
for stage in ${STAGES:-ab tests}; do
case $stage in
ab)
BEFORE=${BEFORE_DIR:-}
if [ -z "$BEFORE" ] && git cat-file -e "${BEFORE_COMMIT:-e4bab40}^{commit}" 2>/dev/null; then
    BEFORE=/tmp/cfc-before; rm -rf "$BEFORE"; mkdir -p "$BEFORE"
    git archive "${BEFORE_COMMIT:-e4bab40}" | tar -x -C "$BEFORE"
fi
[ -n "$BEFORE" ] || { echo "set BEFORE_DIR (see the top of this script)"; exit 2; }
BEFORE=$(cd "$BEFORE" && pwd)
echo "== A/B $(date -u +%FT%TZ)"
for round in 1 2; do
    PYTHONPATH="$BEFORE/plugins:$BEFORE" CFC_AB_EXPECT="$BEFORE" timeout 100 \
        python3 benchmarks/cfc_ab.py "before$round" "$O/before$round" 2>&1 | grep -v Warning
    CFC_AB_EXPECT="$PWD" timeout 100 \
        python3 benchmarks/cfc_ab.py "after$round" "$O/after$round" --compare "$O/before1" 2>&1 | grep -v Warning
done | tee "$O/ab.txt"
python3 - "$O" <<'PY' | tee "$O/summary.txt"
import json, sys
o = sys.argv[1]
runs = {}
for name in ("before1", "before2", "after1", "after2"):
    try:
        runs[name] = json.load(open(f"{o}/{name}/result.json"))
    except OSError:
        print(f"{name}: no result")
if not runs:
    sys.exit(1)
first = next(iter(runs.values()))
print(f"{first['gpu']}: op time per call in us, two rounds per side")
print(f"{'B':>4} {'T':>4} {'H':>4} | {'eager before':>13} {'eager after':>13} {'ratio':>5} | "
      f"{'graph before':>13} {'graph after':>13} {'ratio':>5}   (ratio: best after / best before)")
for i, p in enumerate(first["points"]):
    def cell(side, key):
        got = [runs[n]["points"][i][key] * 1e3 for n in (side + "1", side + "2") if n in runs]
        return "/".join(f"{v:.1f}" for v in got), min(got) if got else float("nan")
    line = f"{p['B']:>4} {p['T']:>4} {p['H']:>4} |"
    for key in ("eager_ms", "graph_ms"):
        (b, bmin), (a, amin) = cell("before", key), cell("after", key)
        line += f" {b:>13} {a:>13} {amin / bmin:>5.2f} |"
    print(line)
for name in ("after1", "after2"):
    if name in runs:
        eq = runs[name]["equal"]
        bad = [k for k, v in eq.items() if not v]
        print(f"{name}: {len(eq) - len(bad)} of {len(eq)} outputs bit for bit equal to before1"
              + (f"; differ: {bad}" if bad else ""))
PY
;;
tests)
echo "== tests $(date -u +%FT%TZ)"
timeout 210 python3 -m pytest -q -p no:cacheprovider tests/test_cfc_scan.py tests/test_launch.py 2>&1 \
    | tee "$O/pytest_gpu.txt" | tail -15
;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
done
echo "== done $(date -u +%FT%TZ)"
