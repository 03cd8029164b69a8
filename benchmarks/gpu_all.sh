#!/usr/bin/env bash
# The one prepared GPU run (issue 12): Triton triage, guard cost + scan correctness, scan speed, training step.
#
#   bash benchmarks/gpu_all.sh          # results under $OUT if set, else benchmarks/out/
#
# Device run (this workplace's `run` tool; first, here: bash benchmarks/gpu_wheels.sh, which fills .whl/ with mambapy;
# without it the run still goes, with pscan reported "not available"), as one line:
#   run(carry=[".whl"], timeout_s=540, command="python3 -m pip install -q --no-index --no-deps --no-compile
#       --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash benchmarks/gpu_all.sh")
#
# Steps, in order, each under its own `timeout` (limits below, cut to what is left of GPU_ALL_BUDGET_S, default 450 s;
# a step that ignores SIGTERM is killed 5 s later, so the whole run stays under 8 minutes on one H100 even then;
# GPU_ALL_LIMIT_<step>=S overrides one step's limit):
#   triage      benchmarks/triton_triage.py --out $OUT/triage (associative-scan probe, tiling sweep, kernel split)
#   env         interpreter, torch, triton, GPU, optional packages
#   check_scan  guard cost on a cold Triton cache, then Triton vs reference (small) and vs torch (full size, bf16)
#   scan_gpu    fwd+bwd vs the HBM floor and vs mambapy's pscan (B=32/L=1024, B=4/L=4096, bf16)
#   train_step  zigzag8_b1_pe2 at batch 32 bf16: MFU, zigzag permutation share, checkpointing memory/speed,
#               other scan backends, compiled step, sampling throughput (rows skipped once its budget is spent)
# A failing or timed-out step is recorded and the next one still runs. Files in $OUT (few, for the device's 8-file
# limit): summary.md (one line per step: result, seconds, key numbers), steps.log (every step's output),
# train_step.md / train_step.json, and whatever triage writes under triage/. The summary is printed last.
# Every interpreter call is ${PYTHON:-python3}; a step's key numbers are its output lines starting "KEY: " (else its
# last line).
set -u -o pipefail # no -e: one failed step must not stop the others

PY="${PYTHON:-python3}"
OUTDIR="${OUT:-}"
[[ -n "$OUTDIR" ]] || OUTDIR="$(cd "$(dirname "$0")" && pwd)/out"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 1 # absolute before leaving the caller's directory
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
DEADLINE=$((START + ${GPU_ALL_BUDGET_S:-450}))
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
SUMMARY_ROWS="$WORK/rows.md"
LOG="$OUTDIR/steps.log"
: >"$SUMMARY_ROWS"
: >"$LOG"
export PYTHONUNBUFFERED=1

# run_step NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (GPU_ALL_LIMIT_NAME if set; less if the
# overall budget has less left), its output appended to steps.log, and record result, seconds and its KEY lines.
run_step() {
    local name=$1 limit=$2
    shift 2
    local override="GPU_ALL_LIMIT_$name"
    limit=${!override:-$limit}
    local left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((left < 5)); then
        record "$name" "skipped: overall budget spent" 0 ""
        return
    fi
    local shown="$*"
    shown="${shown//$'\n'/ }"
    shown="${shown:0:160}"
    echo "=== $name (limit ${limit} s): $shown"
    local t0 rc result
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) result="ok" ;;
        124 | 137) result="timed out after ${limit} s" ;;
        *) result="failed (exit $rc)" ;;
    esac
    {
        echo "################ $name: $result, $(($(date +%s) - t0)) s: $shown"
        cat "$WORK/$name.log"
    } >>"$LOG"
    local keys
    keys=$(sed -n 's/^KEY: //p' "$WORK/$name.log" | paste -sd ';' - | sed 's/;/; /g')
    if [[ -z "$keys" ]]; then # no key numbers (triage prints none): its last line
        keys=$(grep -v '^[[:space:]]*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)
    fi
    record "$name" "$result" $(($(date +%s) - t0)) "$keys"
    echo "    -> $result in $(($(date +%s) - t0)) s"
}

record() { # NAME RESULT SECONDS KEYS
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${4//|//}" >>"$SUMMARY_ROWS"
}

ENV_CODE='
import importlib, platform, torch
print("KEY: python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
found = []
for name in ("triton", "lightning", "mamba_ssm", "selective_scan_cuda", "mambapy", "torchdiffeq"):
    try:
        version = getattr(importlib.import_module(name), "__version__", "(no version)")
        found.append(f"{name} {version}")
    except Exception as err:
        found.append(f"{name} absent ({type(err).__name__})")
print("KEY:", ", ".join(found))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"KEY: {torch.cuda.get_device_name()}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
'

if [[ -f benchmarks/triton_triage.py ]]; then
    run_step triage 110 "$PY" benchmarks/triton_triage.py --out "$OUTDIR/triage"
else
    record triage "missing (benchmarks/triton_triage.py not found)" 0 ""
    echo "=== triage: benchmarks/triton_triage.py not found, skipped"
fi
run_step env 30 "$PY" -c "$ENV_CODE"
# a fresh Triton cache: the guard's first-call cost then includes compiling its kernels, as on a new machine
TRITON_CACHE_DIR="$WORK/triton-cache" run_step check_scan 70 "$PY" benchmarks/check_scan_gpu.py --dtypes bf16
run_step scan_gpu 60 "$PY" benchmarks/scan_gpu.py --warmup 1 --repeats 5 --backends triton pscan cuda
# train_step stops starting rows 60 s before its limit (a compiled row can take a minute); rows left are "skipped"
left=$((DEADLINE - $(date +%s) - 5))
run_step train_step "$left" "$PY" benchmarks/train_step.py --quick --compile --time-budget $((left > 70 ? left - 60 : 10)) \
    --report "$OUTDIR/train_step.md" --json "$OUTDIR/train_step.json"

{
    echo "# gpu_all.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# total $(($(date +%s) - START)) s of a ${GPU_ALL_BUDGET_S:-450} s budget; outputs in $OUTDIR"
    echo
    echo "| step | result | seconds | key numbers |"
    echo "|---|---|---|---|"
    cat "$SUMMARY_ROWS"
} >"$OUTDIR/summary.md"
echo
cat "$OUTDIR/summary.md"
