#!/usr/bin/env bash
# The checks only a GPU can run, prepared as one script for a lent GPU machine (the `device` tool:
# 15 minutes of device time per session, the machine's start included, at most 10 minutes per
# call). Run from the repository root. No GPU figure exists yet, so the figures come first:
#
#   BUILD_S=240 BENCH_S=300 bash benchmarks/device_check.sh build bench   # call 1 (timeout_s 570)
#   TEST_S=<left - 40> bash benchmarks/device_check.sh test   # call 2, at once on the warm machine,
#                     # sized by `status`'s budget_left_s (timeout_s: left - 20): the native tests
#   bash benchmarks/device_check.sh tune sanitize             # a later session: tuning, sanitizers
# (A machine's start takes a minute or two of the 15; call 1 leaves about three for call 2.)
#
# Each stage's time box (seconds) can be set: BUILD_S, TEST_S, SANITIZE_S, TUNE_S, BENCH_S.
# Stages (each time-boxed so the call ends inside its limit, and each logged):
#   build     make env with the CUDA kernels required (FUSED_ATTN_CUDA=1), for this GPU only
#   test      the test suite natively (every backend the GPU serves), in parallel with xdist (the
#             large-offset tests, ~12 GB of GPU memory each, in one worker: --dist loadgroup); it
#             goes on past failures (the first GPU run should name them all, not the first one), and
#             a run stopped at its box still prints the failures so far (SIGINT)
#   (test and bench run the fixed default tiles while none are shipped for this GPU: autotune_mode)
#   sanitize  compute-sanitizer memcheck and racecheck over the cuda and triton kernels
#   tune      python -m benchmarks.tune: the tile choices for this architecture
#   bench     make bench, every suite, within BENCH_S less 30 s (--budget-s: each suite gets a
#             share and writes the rows it has when its share is spent)
# Logs go to $OUT/log.txt; results (benchmarks/results/, tuned tiles, logs) to $OUT/results.tgz,
# which the device tool brings back (it returns at most 8 files, 2 folders deep).
set -uo pipefail
OUT=${OUT:-build/device}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PIP_PROGRESS_BAR=off
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize)

say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
run_stage() {  # run_stage NAME SECONDS COMMAND...: the command's output logged, its status reported
    local name=$1 seconds=$2; shift 2
    say "$name (limit ${seconds}s): $*"
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$LOG" "$OUT/$name.txt" | tail -n 40
    say "$name exit ${PIPESTATUS[0]}"
}

# Without tiles shipped for this GPU, every class would tune on its first call that fills the GPU,
# compiling ~10 candidates in turn (and in each test worker): longer than a stage's box. The tests
# and the benchmarks then run the fixed defaults; FUSED_ATTN_AUTOTUNE set by the caller wins.
autotune_mode() {
    if [ -n "${FUSED_ATTN_AUTOTUNE:-}" ]; then echo "$FUSED_ATTN_AUTOTUNE"
    elif [ -f "fused_attn/triton/tuned/sm$ARCH.json" ]; then echo 1
    else echo 0; fi
}

say "start: ${stages[*]}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"
ARCH=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")

for stage in "${stages[@]}"; do
    case $stage in
        build) run_stage build "${BUILD_S:-300}" env FUSED_ATTN_CUDA=1 FUSED_ATTN_CUDA_ARCHS="$ARCH" MAX_JOBS=16 make env
               say "cuda build note: '$(cat fused_attn/_native_cuda.txt 2>/dev/null)'" ;;
        test) run_stage test "${TEST_S:-330}" env FUSED_ATTN_AUTOTUNE="$(autotune_mode)" python3 -m pytest tests -q -rfE --tb=short --maxfail=100 --durations=25 -n 14 --dist loadgroup --timeout 300 -p no:cacheprovider ;;
        sanitize) run_stage memcheck "${SANITIZE_S:-90}" compute-sanitizer --tool memcheck --error-exitcode 3 \
                      python3 -m benchmarks.sanitize_calls
                  run_stage racecheck "${SANITIZE_S:-90}" compute-sanitizer --tool racecheck --error-exitcode 3 \
                      python3 -m benchmarks.sanitize_calls --small ;;
        tune) run_stage tune "${TUNE_S:-240}" python3 -m benchmarks.tune ;;
        bench) run_stage bench "${BENCH_S:-330}" env FUSED_ATTN_AUTOTUNE="$(autotune_mode)" \
                   make bench ARGS="--budget-s $(( ${BENCH_S:-330} - 30 ))" ;;
        *) say "unknown stage $stage" ;;
    esac
done
cp fused_attn/triton/tuned/*.json "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" benchmarks/results fused_attn/triton/tuned "$OUT"/*.txt 2>/dev/null
say "done"
