#!/usr/bin/env bash
# The one prepared GPU run (issue 8): environment, Triton scan correctness, scan benchmark, training-step benchmark.
#
#   bash benchmarks/gpu_all.sh        # writes every log and table under $OUT if set, else benchmarks/out/
#
# Each step runs under its own time limit (all within GPU_ALL_BUDGET_S, default 530 s, so that the whole run ends
# within ~9 minutes on an H100); a failing or timed-out step is recorded in status.md and the next one still runs.
# The console shows one line per step, then the tables (scan check summary, scan benchmark, training step) and the
# step status last. train_step.py rewrites its report after every row, so a timeout keeps the rows already measured.
set -u -o pipefail  # no -e: one failed step must not stop the others

cd "$(dirname "$0")/.." || exit 1
OUTDIR="${OUT:-benchmarks/out}"
mkdir -p "$OUTDIR"
START=$(date +%s)
DEADLINE=$((START + ${GPU_ALL_BUDGET_S:-530}))
STATUS="$OUTDIR/status.md"
printf '| step | result | seconds | log |\n|---|---|---|---|\n' >"$STATUS"
export PYTHONUNBUFFERED=1

# run_step NAME LIMIT_S COMMAND...: run COMMAND with its output in $OUTDIR/NAME.log, at most LIMIT_S seconds (less
# if the overall budget has less left), and record the exit status.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        echo "| $name | skipped: overall budget spent | 0 | |" >>"$STATUS"
        echo "=== $name: skipped (overall budget spent)"
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0 rc result
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) result="ok" ;;
        124 | 137) result="TIMED OUT after ${limit} s" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    echo "| $name | $result | $(($(date +%s) - t0)) | $name.log |" >>"$STATUS"
    echo "    -> $result in $(($(date +%s) - t0)) s"
}

env_info() {
    nvidia-smi
    python - <<'EOF'
import importlib, platform, subprocess, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "lightning", "mamba_ssm", "causal_conv1d", "mambapy", "torchdiffeq"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), f"| {p.total_memory / 2**30:.0f} GiB | {p.multi_processor_count} SMs")
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
EOF
}

export -f env_info
run_step env 30 bash -c env_info
run_step check_scan_gpu 130 python benchmarks/check_scan_gpu.py
run_step scan_gpu 100 python benchmarks/scan_gpu.py --warmup 1 --repeats 5
# train_step stops starting rows 75 s before its limit (a compile row can take a minute); rows left are "skipped"
left=$((DEADLINE - $(date +%s) - 5))
budget=$((left - 75))
((budget < 1)) && budget=1
run_step train_step "$left" python benchmarks/train_step.py --quick --compile --time-budget "$budget" \
    --report "$OUTDIR/train_step.md" --json "$OUTDIR/train_step.json"

echo
echo "################ environment"
grep -E "^(python|triton|lightning|mamba_ssm|causal_conv1d|mambapy|torchdiffeq|device|commit) " "$OUTDIR/env.log"
grep -E "Driver Version" "$OUTDIR/env.log"
echo
echo "################ check_scan_gpu (failures and verdict; full table in check_scan_gpu.log)"
grep -E "FAIL|OVERALL|Error|error" "$OUTDIR/check_scan_gpu.log" | head -n 40
tail -n 3 "$OUTDIR/check_scan_gpu.log"
echo
echo "################ scan_gpu"
grep -E "^(#|\|)" "$OUTDIR/scan_gpu.log" || tail -n 20 "$OUTDIR/scan_gpu.log"
echo
echo "################ train_step"
if [[ -s "$OUTDIR/train_step.md" ]]; then cat "$OUTDIR/train_step.md"; else tail -n 30 "$OUTDIR/train_step.log"; fi
grep -E "^\[ *[0-9.]+ s\]|Error" "$OUTDIR/train_step.log" | tail -n 20
echo
echo "################ steps (total $(($(date +%s) - START)) s; logs in $OUTDIR)"
cat "$STATUS"
