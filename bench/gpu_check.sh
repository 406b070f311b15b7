#!/usr/bin/env bash
# The GPU proof in one command: correctness and speed of nfcore on a CUDA GPU, in about five
# minutes, written to OUT_DIR/report.md with one log per part.
#
#   bash bench/gpu_check.sh OUT_DIR              # the whole check, at most 6 minutes
#   bash bench/gpu_check.sh --quick OUT_DIR      # smaller, at most 3 minutes
#   bash bench/gpu_check.sh --simulate OUT_DIR   # no GPU: Numba's CUDA simulator, tiny sizes
#
# Run it from anywhere; it works in the repository root with PYTHONPATH=. and needs no
# installation: python3 (or $PYTHON) with numpy, scipy, numba, numba-cuda, cupy, torch (CUDA),
# h5py, tqdm, pillow, matplotlib, scikit-learn, threadpoolctl, pytest. The parts, most
# important first, so that a run cut off early still reports what matters most:
#
#   a  machine   GPU name, driver, versions of cupy, numba, numba-cuda, torch
#   b  tests     pytest tests/gpu on the GPU: every CUDA kernel against the CPU kernels, every
#                layer on CuPy against NumPy
#   c  invconv   bench/invconv.py --gpu --torch: forward, backward, the wavefront inverse (one
#                sweeping kernel; "diagonal": one launch per anti-diagonal), the raster
#                baseline, PyTorch CUDA conv2d on the same shape, 32² to 256²
#   d  sampling  bench/sampling.py --gpu: sampling time of finc, cinc, emerging, glow1x1
#                models at 16², 32², 64², 128² (the FInC paper's study)
#   e  training  bench/gpu_train.py: one step of every step kind, CuPy against NumPy; then
#                train.run --backend gpu against --backend cpu on digits and a CIFAR-shaped set:
#                bits/dim equal within float32 rounding, images/s
#   f  twin      bench/twin.py --device cuda: nfcore on CuPy against the PyTorch twin on CUDA,
#                agreement, training images/s and sampling time
#   g  nccl      bench/gpu_distributed.py: 5 steps of mpiexec -n 1 python -m train.run
#                --distributed --backend gpu (the NCCL set-up and Allreduce, on one GPU)
#                against the same 5 steps of --backend cpu: test bits/dim after each step and
#                the steps' train bits/dim equal to 1e-4 relative (needs MPI: .[mpi])
#
# Each part has its own time limit and a shared deadline (360 s, 160 s with --quick); a part
# that runs out is reported TIMED OUT with what its log holds so far. Exit status: 0 when every
# part passed or was skipped, 1 when any failed or timed out, 2 for a wrong command line.
# --simulate sets NUMBA_ENABLE_CUDASIM=1: part b runs the kernels under the simulator, and the
# parts that need CuPy or CUDA (c-g) are reported as skipped, not failed.
set -uo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
QUICK=0
SIMULATE=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --simulate) SIMULATE=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) if [ -n "$OUT" ]; then echo "error: one OUT_DIR, got '$OUT' and '$arg'" >&2; exit 2; fi
           OUT="$arg" ;;
    esac
done
if [ -z "$OUT" ]; then echo "error: give an OUT_DIR" >&2; usage >&2; exit 2; fi
mkdir -p "$OUT" || { echo "error: cannot make $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ "$SIMULATE" = 1 ]; then export NUMBA_ENABLE_CUDASIM=1; fi

if [ "$SIMULATE" = 1 ]; then MODE="CUDA simulator (no GPU)"; else MODE="GPU"; fi
if [ "$QUICK" = 1 ]; then DEADLINE=160; else DEADLINE=360; fi
START=$(date +%s)
REPORT="$OUT/report.md"
FAILED=0
SUMMARY=""

{
    echo "# nfcore GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode: $MODE$([ "$QUICK" = 1 ] && echo ', --quick'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'), deadline ${DEADLINE} s"
    echo
} > "$REPORT"

# What the machine offers; the parts below that need CuPy or torch CUDA are skipped without.
"$PYTHON" - > "$OUT/.have" 2>/dev/null <<'EOF'
import importlib.util
cupy = False
if importlib.util.find_spec("cupy") is not None:
    try:
        import cupy as cp
        cupy = cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        cupy = False
torch_cuda = False
if importlib.util.find_spec("torch") is not None:
    try:
        import torch
        torch_cuda = torch.cuda.is_available()
    except Exception:
        torch_cuda = False
print(int(cupy), int(torch_cuda))
EOF
read -r HAVE_CUPY HAVE_TORCH_CUDA < "$OUT/.have" || { HAVE_CUPY=0; HAVE_TORCH_CUDA=0; }
rm -f "$OUT/.have"

# part ID TITLE LIMIT_S NEEDS COMMAND...: run COMMAND with its log in OUT/ID.log, at most
# LIMIT_S seconds (less if the deadline is nearer), and append its section to the report.
# NEEDS: "" or a space-separated list of cupy / torch_cuda; a part whose need is missing is
# skipped under --simulate and failed otherwise (a GPU machine without CuPy proves nothing).
part() {
    local id="$1" title="$2" limit="$3" needs="$4"
    shift 4
    local log="$OUT/$id.log" status rc elapsed left need missing=""
    for need in $needs; do
        if [ "$need" = cupy ] && [ "$HAVE_CUPY" != 1 ]; then missing="$missing, CuPy with a GPU"; fi
        if [ "$need" = torch_cuda ] && [ "$HAVE_TORCH_CUDA" != 1 ]; then missing="$missing, torch with CUDA"; fi
    done
    missing="${missing#, }"
    left=$(( DEADLINE - ($(date +%s) - START) ))
    if [ "$left" -lt "$limit" ]; then limit="$left"; fi
    local begin=$(date +%s)
    if [ -n "$missing" ]; then
        echo "needs: $missing" > "$log"
        if [ "$SIMULATE" = 1 ]; then status="skipped (needs $missing)"; else status="FAILED (needs $missing)"; FAILED=1; fi
    elif [ "$limit" -le 5 ]; then
        echo "not run: the ${DEADLINE} s deadline was reached" > "$log"
        status="TIMED OUT (not started: deadline reached)"; FAILED=1
    else
        echo "\$ $*" > "$log"
        # through bash -c, so that the exported shell functions below can be parts too
        timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >> "$log" 2>&1
        rc=$?
        if [ "$rc" = 0 ]; then status="passed"
        elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT after ${limit} s"; FAILED=1
        else status="FAILED (exit status $rc)"; FAILED=1
        fi
    fi
    elapsed=$(( $(date +%s) - begin ))
    SUMMARY="$SUMMARY| $id | $title | $status | $elapsed | $id.log |"$'\n'
    {
        echo "## $id. $title: $status ($elapsed s)"
        echo
        echo '```'
        if [ "$id" = b ]; then   # the tests: the header, then failures and the summary
            grep -E '^tests/gpu:|^platform' "$log"
            grep -E 'FAILED|ERROR|Error|passed|failed|skipped|no tests ran' "$log" | tail -n 40
        else
            tail -n 80 "$log"
        fi
        echo '```'
        echo
    } >> "$REPORT"
    echo "[gpu_check] $id. $title: $status ($elapsed s)" >&2
}

machine() {
    if [ "$SIMULATE" != 1 ]; then
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv \
                || return 1
        else
            echo "no nvidia-smi on the PATH"
        fi
    fi
    "$PYTHON" - "$SIMULATE" <<'EOF'
import importlib.metadata as metadata
import platform
import sys

simulate = sys.argv[1] == "1"
print(f"python {platform.python_version()}, {platform.platform()}")
for name in ("numpy", "scipy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "cupy",
             "torch", "h5py", "pytest"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
from numba import cuda
if simulate:
    print("Numba CUDA: the simulator (NUMBA_ENABLE_CUDASIM=1)")
    sys.exit(0)
if not cuda.is_available():
    print("error: Numba sees no CUDA GPU (use --simulate on a machine without one)")
    sys.exit(1)
device = cuda.get_current_device()
print(f"Numba CUDA device: {device.name.decode() if isinstance(device.name, bytes) else device.name}, "
      f"compute capability {device.compute_capability}")
try:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"CuPy: {props['name'].decode()}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}, "
          f"{props['totalGlobalMem'] / 2**30:.1f} GiB")
except Exception as error:
    print(f"CuPy: not usable ({error})")
try:
    import torch
    print(f"torch CUDA: {torch.cuda.is_available()}, {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
except Exception as error:
    print(f"torch: not usable ({error})")
EOF
}

# gpu_tests PYTEST_ARGS...: pytest on tests/gpu, failed unless its header says the tests ran
# where they should (on the GPU with CuPy arrays, or under the simulator) and some passed.
gpu_tests() {
    local expected="real GPU (CuPy arrays)" rc
    if [ "$SIMULATE" = 1 ]; then expected="CUDA simulator"; fi
    "$PYTHON" -m pytest -p no:cacheprovider -rs "$@" | tee "$OUT/.pytest.out"
    rc=${PIPESTATUS[0]}
    if ! grep -q "^tests/gpu: $expected" "$OUT/.pytest.out"; then
        echo "error: the GPU tests did not run on: $expected"; rc=1
    elif ! grep -qE '[0-9]+ passed' "$OUT/.pytest.out"; then
        echo "error: no GPU test passed"; rc=1
    fi
    rm -f "$OUT/.pytest.out"
    return "$rc"
}
export -f machine gpu_tests
export PYTHON SIMULATE OUT

if [ "$SIMULATE" = 1 ]; then
    # tiny sizes; the simulator runs the kernels in Python threads
    part a "machine" 30 "" machine
    part b "pytest tests/gpu, a few kernels (CUDA simulator)" 60 "" \
        gpu_tests tests/gpu/test_cuda_kernels.py \
        -k "float32 and (rectangular or per_diagonal or finc_unit or raster_inverse)"
    part c "InvConv kernels against PyTorch CUDA conv2d" 10 "cupy torch_cuda" true
    part d "sampling time against image size" 10 "cupy" true
    part e "training, GPU against CPU" 10 "cupy" true
    part f "PyTorch twin on CUDA" 10 "cupy torch_cuda" true
    part g "distributed training on one GPU (NCCL), against the CPU" 10 "cupy" true
elif [ "$QUICK" = 1 ]; then
    part a "machine" 15 "" machine
    part b "pytest tests/gpu (float32)" 55 "cupy" gpu_tests -x tests/gpu -k "not float64"
    part c "InvConv kernels against PyTorch CUDA conv2d" 15 "cupy torch_cuda" \
        "$PYTHON" bench/invconv.py --gpu --torch --shapes 64x12x32 64x12x128
    part d "sampling time against image size" 15 "cupy" \
        "$PYTHON" bench/sampling.py --gpu --sizes 16 64 --repeats 1 --budget 5
    part e "training, GPU against CPU" 20 "cupy" "$PYTHON" bench/gpu_train.py --quick "$OUT/e_runs"
    part f "PyTorch twin on CUDA" 10 "cupy torch_cuda" \
        "$PYTHON" bench/twin.py --device cuda --skip-check --invconv finc --no-sample --rounds 1
    part g "distributed training on one GPU (NCCL), against the CPU" 40 "cupy" \
        "$PYTHON" bench/gpu_distributed.py "$OUT/g_runs"
else
    part a "machine" 15 "" machine
    part b "pytest tests/gpu" 110 "cupy" gpu_tests tests/gpu
    part c "InvConv kernels against PyTorch CUDA conv2d" 40 "cupy torch_cuda" \
        "$PYTHON" bench/invconv.py --gpu --torch --shapes 64x12x32 64x12x64 64x12x128 64x12x256
    part d "sampling time against image size" 45 "cupy" \
        "$PYTHON" bench/sampling.py --gpu --sizes 16 32 64 128 --repeats 2 --budget 8
    part e "training, GPU against CPU" 50 "cupy" "$PYTHON" bench/gpu_train.py "$OUT/e_runs"
    part f "PyTorch twin on CUDA" 40 "cupy torch_cuda" \
        "$PYTHON" bench/twin.py --device cuda --invconv finc glow1x1 --rounds 1
    part g "distributed training on one GPU (NCCL), against the CPU" 60 "cupy" \
        "$PYTHON" bench/gpu_distributed.py "$OUT/g_runs"
fi

{
    echo "## Summary ($(( $(date +%s) - START )) s)"
    echo
    echo "| part | what | status | s | log |"
    echo "|---|---|---|---:|---|"
    printf '%s' "$SUMMARY"
} >> "$REPORT"
echo "[gpu_check] report: $REPORT" >&2
exit "$FAILED"
