#!/usr/bin/env bash
# The C++ kernels' tests again, under AddressSanitizer and UndefinedBehaviorSanitizer: `make test`
# runs this after the suite (`make test-sanitized`).
#
# Natively run C++ that reads past a tensor's end (one row too many, a vector load past the last
# element) rarely crashes and often passes the accuracy checks; with ASan it fails at once and the
# report names the line. UBSan adds misaligned accesses, bad shifts and fixed-size array bounds.
# This builds a sanitized copy of the package in build/sanitized/tree (FUSED_ATTN_SANITIZE=
# address,undefined: setup.py's CPU extension, and the CUDA kernels' emulator when its tests
# build it), then runs there, with the sanitizer preloaded into Python:
#   - the `cpu` backend's tests, once per CPU kernel set this CPU runs (AVX-512 with its best bf16
#     products and with fp32 ones, AVX2, portable; test_native.py runs each bf16 kind the CPU has);
#   - the `cuda` backend's tests on the emulator (tests/cuda_emulator/).
# Usage: tests/run_sanitized.sh PYTHON [pytest args]
set -euo pipefail
PYTHON=$1
shift
if [[ $PYTHON == */* ]]; then  # the runs below change directory
    PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TREE=$ROOT/build/sanitized/tree
LOGS=$ROOT/build/sanitized/logs

# Python is not linked against the sanitizer, so its runtime must be loaded first, and libstdc++
# with it (ASan's __cxa_throw interceptor fails on a C++ exception otherwise).
ASAN_RUNTIME=$(${CXX:-c++} -print-file-name=libasan.so)
STDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
if [[ ! -e $ASAN_RUNTIME ]]; then
    echo "error: the C++ compiler has no AddressSanitizer runtime (libasan.so); install it (Debian: libasan8)" >&2
    exit 1
fi

# The copy keeps its files' times, so an unchanged source is not recompiled on the next run.
mkdir -p "$TREE" "$LOGS"
tar cf - --exclude='*.so' --exclude=__pycache__ setup.py pyproject.toml README.md fused_attn csrc tests |
    tar xf - -C "$TREE"
echo "building the sanitized extension in $TREE"
export FUSED_ATTN_SANITIZE=address,undefined
(cd "$TREE" && FUSED_ATTN_CUDA=0 FUSED_ATTN_NATIVE=1 "$PYTHON" setup.py -q build_ext --inplace \
    > "$LOGS/build.log" 2>&1) || { tail -30 "$LOGS/build.log"; exit 1; }

status=0
run() {  # a label, then environment assignments and pytest arguments
    local label=$1
    shift
    rm -f "$LOGS/$label".*
    echo "sanitized: $label"
    # log_path: pytest captures file descriptor 2, and a report written there would be lost.
    # No GPU in sight: the tests then run the C++ on CPU tensors, as in CI. (protect_shadow_gap=0:
    # a CUDA build of torch may map memory where ASan would otherwise reserve it.)
    if ! (cd "$TREE" && env ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:log_path=$LOGS/$label" \
            UBSAN_OPTIONS="print_stacktrace=1:log_path=$LOGS/$label" CUDA_VISIBLE_DEVICES= \
            LD_PRELOAD="$ASAN_RUNTIME $STDCXX" "$@"); then
        grep -hv "ASan doesn't fully support makecontext" "$LOGS/$label".* 2>/dev/null || true
        status=1
    fi
}
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider "$@")
CPU_TESTS=(tests/test_native.py tests/test_accuracy.py tests/test_variants.py tests/test_varlen.py
           tests/test_kvcache.py tests/test_random_configs.py tests/test_semantics.py -k "cpu or native")
ISA=$(cd "$TREE" && LD_PRELOAD="$ASAN_RUNTIME $STDCXX" ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 CUDA_VISIBLE_DEVICES= "$PYTHON" -c \
      "from fused_attn.backends import cpu_backend; print(cpu_backend.active_isa())")
case $ISA in
    avx512) kernel_sets=(avx512 avx512-fp32 avx2 portable) ;;
    avx2) kernel_sets=(avx2 portable) ;;
    *) kernel_sets=(portable) ;;
esac
for set in "${kernel_sets[@]}"; do
    isa=${set%-fp32}
    bf16=$([[ $set == *-fp32 ]] && echo fp32 || echo amx)
    run "cpu-$set" FUSED_ATTN_CPU_ISA="$isa" FUSED_ATTN_CPU_BF16="$bf16" "${PYTEST[@]}" "${CPU_TESTS[@]}"
done
# (less the check of how this build says it has no CUDA kernels: FUSED_ATTN_CUDA=0 above)
run cuda-emulated "${PYTEST[@]}" tests/test_cuda_emulated.py \
    tests/test_cuda_emulated_backward.py tests/test_cuda_emulator.py \
    --deselect tests/test_cuda_emulated.py::test_real_backend_says_why_it_is_unavailable
exit $status
