#!/usr/bin/env bash
# The GPU checks of issue 16, for a CUDA machine without network access.
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT
#
# Expects an image with Python 3.12, a CUDA build of torch (2.11 or newer), safetensors,
# pyarrow, huggingface_hub, click, pyyaml, tqdm, numpy, matplotlib, pytest, hypothesis and
# psutil. What else the project imports (blake3, zstandard; pytest-timeout for the test
# settings) travels with the working tree as wheels made beforehand on a networked machine
# (`make gpu-wheels`, into benchmarks/wheels/) and is installed here with pip --no-index into
# a private folder put on PYTHONPATH: nothing is downloaded and the image is not changed.
#
# Steps, each logged into the output folder ($OUT, else ./gpu-check-out):
#   1. environment.txt: Python, torch, CUDA, the GPU, the wheels installed;
#   2. stop with exit status 2 and a one-line reason when no CUDA device is usable;
#   3. the conversion tests (tests/test_convert_speed_paths.py, whose CUDA tests run only
#      here): pytest.log and pytest.xml;
#   4. benchmarks/gpu.py (end-to-end export with --device cuda against --device cpu, byte for
#      byte, then in-memory casts and statistics): gpu.log and gpu-results.md.
# Exit status: 0 when everything passed, 1 when a test or check failed, 2 when it could not run.
# GPU_CHECK_SHAPE (160m or quick, default 160m) and GPU_CHECK_REPEATS (default 2) size step 4.
# GPU_CHECK_DEVICE=cpu is a dry run of steps 3 and 4 on a machine without a GPU (gpu.py then
# runs its device code on the host; its numbers mean nothing): it checks this script.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-check-out}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=${TMPDIR:-/tmp}/neox-gpu-check
SITE=$WORK/site
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
: >"$LOG"

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
fail() { say "cannot run: $*"; echo "status=2" >"$OUT/status"; exit 2; }

command -v "$PY" >/dev/null || fail "no $PY on PATH (set PYTHON=...)"

# 1. Wheels prepared by `make gpu-wheels`: installed into a private target, never the image.
rm -rf "$SITE"
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
        --target "$SITE" benchmarks/wheels/*.whl >>"$LOG" 2>&1 \
        || fail "pip could not install benchmarks/wheels/*.whl (see $LOG)"
else
    say "no benchmarks/wheels/*.whl: relying on the image for blake3 and zstandard"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - >"$OUT/environment.txt" 2>>"$LOG" <<'PYEOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "safetensors", "pyarrow", "numpy", "blake3", "zstandard", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # noqa: BLE001 - reported, the checks below decide
        print(name, "MISSING", type(exc).__name__, exc)
import torch
print("cuda build", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print("device", i, torch.cuda.get_device_name(i))
PYEOF
cat "$OUT/environment.txt" | tee -a "$LOG"

# 2. A clear stop where there is nothing to measure.
if [ "$DEVICE" = cpu ]; then
    say "GPU_CHECK_DEVICE=cpu: dry run on the host, not a GPU check"
else
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() else 3)' \
        2>>"$LOG" || fail "no CUDA device is available to torch (torch.cuda.is_available() is False)"
fi
"$PY" -c 'import exporter.cli, exporter.convert.device, exporter.convert.compress, exporter.convert.digest' \
    2>>"$LOG" || fail "the project does not import here (missing wheel? see $LOG)"

status=0
# 3. Tests: the CUDA ones are skipped elsewhere, so "skipped" in this log is a failure to look at.
say "tests ..."
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_convert_speed_paths.py \
    --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1 || status=1
tail -n 5 "$OUT/pytest.log" | tee -a "$LOG"
if [ "$DEVICE" != cpu ] && grep -q "SKIPPED.*CUDA" "$OUT/pytest.log"; then
    say "CUDA tests were skipped although a device is present"; status=1
fi

# 4. The benchmark; its working files stay out of $OUT (gigabytes).
say "benchmarks/gpu.py ..."
"$PY" benchmarks/gpu.py --out "$OUT/gpu-results.md" --workdir "$WORK/bench" --device "$DEVICE" \
    --shape "${GPU_CHECK_SHAPE:-160m}" --repeats "${GPU_CHECK_REPEATS:-2}" \
    >"$OUT/gpu.log" 2>&1
bench=$?
tail -n 20 "$OUT/gpu.log" | tee -a "$LOG"
if [ "$bench" -eq 2 ]; then
    say "benchmarks/gpu.py could not run (exit 2)"; status=1
elif [ "$bench" -ne 0 ]; then
    say "benchmarks/gpu.py: a check failed (exit $bench)"; status=1
fi
rm -rf "$WORK/bench"
echo "status=$status" >"$OUT/status"
say "done, status $status; results in $OUT"
exit "$status"
