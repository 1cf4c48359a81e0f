#!/usr/bin/env bash
# One pass on a machine with a CUDA GPU, in under ~11 minutes: install, the CUDA tests, the step-time benchmark.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere in the repository
#   bash benchmarks/gpu_check.sh --fetch-wheels  # beforehand, on a machine that reaches PyPI (see below)
#
# 1. Python: the first of $PYTHON, python3 that imports torch is used as it is (its CUDA build is kept); with
#    none, a venv .venv-gpu gets torch==2.14.1 torchvision==0.29.1. A machine without network access takes the
#    packages torch's image may lack (datasets, evaluate, dill, multiprocess) and the versions this project is
#    tested with (transformers, timm, accelerate) as wheels in .whl/: `--fetch-wheels` downloads them (Python
#    3.12, any x86-64 Linux) and git-ignores the folder; carry .whl with the working tree. Then
#    `pip install -e .` (offline: --no-deps, and `pip check` says what is still missing).
# 2. `pytest -m cuda tests/test_cuda.py`: fp16 + GradScaler and bf16 training through `accelerate launch`, and a
#    killed fp16 run that resumes exactly.
# 3. benchmarks/step_time.py on ConvNeXt-T -> DeiT-T and Swin-T -> ResNet-18 at 224, batch 128: fp16 eager, then
#    bf16 channels-last, then bf16 eager vs torch.compile (--compile both).
# Results: benchmarks/results/gpu_<name>.md (and the logs), copied into $OUT when it is set. Every phase has its
# own time limit, so a phase that hangs costs its limit, not the run; the exit status is non-zero if one failed.
set -uo pipefail

WHEELS=(datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 timm==1.0.31
        accelerate==1.16.0)
TESTS_LIMIT_S=${TESTS_LIMIT_S:-240}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-150}

cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
log() { echo "[gpu_check +$(($(date +%s) - START))s] $*"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || exit 1
    if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
        grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    fi
    log "wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
    exit 0
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
FAILED=()

# ---- 1. install ----
PY=""
for candidate in "${PYTHON:-}" python3; do
    if [ -n "$candidate" ] && "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    log "no Python with torch: creating .venv-gpu with torch==2.14.1 torchvision==0.29.1"
    python3 -m venv .venv-gpu && PY=.venv-gpu/bin/python
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 || { log "FAILED: torch install"; exit 1; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade .whl/*.whl || FAILED+=("wheels")
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || log "pip install -e . failed: using PYTHONPATH"
else
    "$PY" -m pip install -q --retries 0 --timeout 10 -e ".[test]" || log "pip install -e '.[test]' failed: using PYTHONPATH"
fi
"$PY" -m pip check 2>&1 | grep -iE "pat-hf|datasets|evaluate|transformers|timm|accelerate|torch" || true
if ! "$PY" -c "import pat_hf.train, pytest" 2>"$LOGS/import_error.txt"; then
    log "FAILED: pat_hf does not import ($(tail -1 "$LOGS/import_error.txt")); carry the missing packages in .whl"
    exit 1
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
if [ -z "$GPU" ]; then log "FAILED: torch sees no CUDA GPU"; exit 1; fi
NAME=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '_' | sed 's/^_*//; s/_*$//')
REPORT=$RESULTS/gpu_$NAME.md
log "$GPU; $("$PY" -c "import torch, timm, transformers, accelerate; print(f'torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')")"

# ---- 2. CUDA tests ----
log "CUDA tests (limit ${TESTS_LIMIT_S}s)"
timeout "$TESTS_LIMIT_S" "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider >"$LOGS/cuda_tests.txt" 2>&1
TESTS_STATUS=$?
TESTS_SUMMARY=$(tail -1 "$LOGS/cuda_tests.txt")
[ "$TESTS_STATUS" -eq 124 ] && TESTS_SUMMARY="stopped at the ${TESTS_LIMIT_S}s limit"
[ "$TESTS_STATUS" -ne 0 ] && FAILED+=("cuda tests") && tail -40 "$LOGS/cuda_tests.txt"
log "CUDA tests: $TESTS_SUMMARY"

# ---- 3. step time ----
bench() {  # NAME, then step_time.py flags
    local name=$1; shift
    log "step time: $name (limit ${BENCH_LIMIT_S}s)"
    timeout "$BENCH_LIMIT_S" "$PY" benchmarks/step_time.py --device cuda --batch-size 128 \
        --pairs convnext-deit swin-resnet --distillers vanilla kd ofa pat "$@" \
        --output "$LOGS/step_time_$name.md" >"$LOGS/step_time_$name.txt" 2>&1
    local status=$?
    [ "$status" -eq 124 ] && echo "(stopped at the ${BENCH_LIMIT_S}s limit; the pairs above were measured)" \
        >>"$LOGS/step_time_$name.md"
    [ "$status" -ne 0 ] && FAILED+=("step time $name") && tail -20 "$LOGS/step_time_$name.txt"
}
bench fp16 --precision fp16
bench bf16_channels_last --precision bf16 --channels-last
# Eager and torch.compile (inductor) rows of one run (the later --distillers wins); the warm-up steps compile,
# so it gets a longer limit.
BENCH_LIMIT_S=$((BENCH_LIMIT_S + 90)) bench bf16_compile --precision bf16 --compile both --distillers vanilla kd pat \
    --warmup-steps 3

{
    echo "## $GPU"
    echo
    echo "From benchmarks/gpu_check.sh, $(date -u +%Y-%m-%d). CUDA tests: $TESTS_SUMMARY."
    for name in fp16 bf16_channels_last bf16_compile; do
        echo
        cat "$LOGS/step_time_$name.md" 2>/dev/null || echo "step time $name: no result (see logs/step_time_$name.txt)"
    done
} >"$REPORT.partial" && mv "$REPORT.partial" "$REPORT"

if [ -n "${OUT:-}" ]; then
    cp "$REPORT" "$LOGS/cuda_tests.txt" "$OUT/" 2>/dev/null
    for name in fp16 bf16_channels_last bf16_compile; do cp "$LOGS/step_time_$name.txt" "$OUT/" 2>/dev/null; done
fi
cat "$REPORT"
if [ ${#FAILED[@]} -gt 0 ]; then log "FAILED: ${FAILED[*]}"; exit 1; fi
log "all passed; $REPORT"
