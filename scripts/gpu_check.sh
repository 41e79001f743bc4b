#!/usr/bin/env bash
# The time-boxed GPU check: scripts/gpu_check.sh part1|part2 OUTDIR [gpu_bench.py init options]
#
# Runs from the source tree (PYTHONPATH=src; nothing is installed), with the wheels and LPIPS
# weights that scripts/prepare_gpu_carry.sh put in .gpu_carry/. Each phase runs as its own process
# under `timeout`; every row lands in OUTDIR/results.json and OUTDIR/results.md as soon as it is
# measured, so a run cut short still returns what it did. A time budget (--budget_s, default
# 300 s) bounds the part: phases and rows not started by then are marked skipped.
#
#   part1: env + import check, pytest -m gpu, decode 1024 eager levers with ablation, one training
#          step (plain diffusers vs vaekit), a 60 s `vaekit train` with SIGTERM, resume, export
#   part2: env + import check, bulk `vaekit encode` end to end vs the encoder alone, decode 1024 b4
#          and encode 256 b64 compiled (diffusers channels_last+compile vs vaekit, one compile per model)
#
# OUTDIR gets three files: results.json, results.md, log.txt (every phase's output). Working files
# (images, caches, the training run) go to $GPU_CHECK_SCRATCH (default ${TMPDIR:-/tmp}/vaekit-gpu-check).
# Rehearsal on a CPU: scripts/gpu_check.sh part1 OUT --device cpu   (tiny sizes, about a minute)
set -u

if [ $# -lt 2 ]; then
    echo "usage: $0 part1|part2 OUTDIR [gpu_bench.py init options]" >&2
    exit 2
fi
PART=$1
OUT=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
BENCH="$ROOT/scripts/gpu_bench.py"
WORK=${GPU_CHECK_SCRATCH:-${TMPDIR:-/tmp}/vaekit-gpu-check}
SCRATCH="$WORK/$PART"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# Carried wheels: only those the machine lacks go on the path (scripts/gpu_carry.py says which).
CARRY_PATH=$("$PYTHON" "$ROOT/scripts/gpu_carry.py" --wheels "$ROOT/.gpu_carry/wheels" --unpack "$WORK/carry" \
    --report "$WORK/carry.json" 2>>"$LOG")
export PYTHONPATH="$ROOT/src${CARRY_PATH:+:$CARRY_PATH}${PYTHONPATH:+:$PYTHONPATH}"
# A fresh fp32 weights cache, filled by the env phase from .gpu_carry/lpips (nothing is downloaded).
export VAEKIT_CACHE=${VAEKIT_CACHE:-$SCRATCH/vaekit-cache}
export VAEKIT_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TOKENIZERS_PARALLELISM=false

bench() { "$PYTHON" "$BENCH" "$@"; }

if ! bench init "$PART" "$OUT" --scratch "$SCRATCH" "$@" >>"$LOG" 2>&1; then
    say "gpu_check: init failed:"
    tail -5 "$LOG"
    exit 2
fi
DEADLINE=$(bench deadline "$OUT")
mapfile -t PHASES < <(bench phases "$OUT")
say "gpu_check $PART: ${#PHASES[@]} phases, budget until $(date -d "@$DEADLINE" +%H:%M:%S 2>/dev/null || echo "$DEADLINE")"

SKIP=""
STATUS=0
for line in "${PHASES[@]}"; do
    read -r PHASE LIMIT <<<"$line"
    if [ -n "$SKIP" ]; then
        bench close "$OUT" "$PHASE" --skip "$SKIP" >>"$LOG" 2>&1
        continue
    fi
    LEFT=$((DEADLINE - $(date +%s)))
    if [ "$LEFT" -lt 1 ]; then
        bench close "$OUT" "$PHASE" --skip "the time budget was spent" >>"$LOG" 2>&1
        say "== $PHASE: skipped (time budget spent)"
        STATUS=1
        continue
    fi
    [ "$LIMIT" -gt "$LEFT" ] && LIMIT=$LEFT
    say "== $PHASE (limit ${LIMIT} s) $(date +%H:%M:%S)"
    echo "===== phase $PHASE" >>"$LOG"
    timeout --kill-after=10 "$LIMIT" "$PYTHON" "$BENCH" run "$OUT" "$PHASE" >>"$LOG" 2>&1
    RC=$?
    bench close "$OUT" "$PHASE" --rc "$RC" --limit "$LIMIT" >>"$LOG" 2>&1
    CLOSE=$?
    say "   $PHASE: exit $RC $(date +%H:%M:%S)"
    if [ "$RC" -ne 0 ]; then STATUS=1; fi
    if [ "$CLOSE" -eq 3 ]; then SKIP="the environment check failed (results.md says why)"; fi
done

bench report "$OUT" 2>>"$LOG"
exit $STATUS
