"""benchmarks/gpu_all.sh driven by a stand-in interpreter (PYTHON=...): step order, per-step timeouts, the files it
leaves in $OUT and the summary, without a GPU. The stand-in records each call, prints a KEY line, writes the files a
step is asked for, and misbehaves for the step named in STUB_SLEEP (sleeps past its limit) or STUB_FAIL (exits 3).
"""

import os
import shutil
import stat
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_all.sh"

STUB = r"""#!/usr/bin/env bash
step=$(basename "${1:-}" .py)
if [[ "$1" == "-c" ]]; then step=env; echo "-c (code)" >>"$STUB_CALLS"; else echo "$*" >>"$STUB_CALLS"; fi
[[ "$step" == "$STUB_SLEEP" ]] && exec sleep 30
echo "KEY: $step ran | fine"
echo "last line of $step"
[[ "$step" == "$STUB_FAIL" ]] && exit 3
while (($#)); do
    case $1 in
        --json) echo '{"rows": []}' >"$2" ;;
        --report) echo "# report" >"$2" ;;
        --out) mkdir -p "$2" && echo triage >"$2/triage.md" ;;
    esac
    shift
done
exit 0
"""


@pytest.fixture
def stub(tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("needs coreutils' timeout")
    path = tmp_path / "python3"
    path.write_text(STUB)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_gpu_all(tmp_path, stub, **env):
    calls = tmp_path / "calls.txt"
    calls.touch()
    out = tmp_path / "out"
    environ = {**os.environ, "PYTHON": str(stub), "OUT": str(out), "STUB_CALLS": str(calls), "STUB_SLEEP": "",
               "STUB_FAIL": "", **env}  # fmt: skip
    result = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines(), out


def test_gpu_all_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_all_runs_every_step_in_order_and_reports_each(tmp_path, stub):
    triage_missing = not (ROOT / "benchmarks" / "triton_triage.py").exists()
    result, calls, out = run_gpu_all(tmp_path, stub, STUB_SLEEP="scan_gpu", STUB_FAIL="check_scan_gpu",
                                     GPU_ALL_LIMIT_scan_gpu="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    scripts = [c.split()[0] for c in calls]
    expected = ["-c", "benchmarks/check_scan_gpu.py", "benchmarks/scan_gpu.py", "benchmarks/train_step.py"]
    if not triage_missing:
        expected.insert(0, "benchmarks/triton_triage.py")
        assert calls[0] == f"benchmarks/triton_triage.py --out {out}/triage"
    assert scripts == expected
    assert f"--report {out}/train_step.md --json {out}/train_step.json" in calls[-1]

    summary = (out / "summary.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in summary.splitlines()[5:]]
    rows = {name: rest for name, *rest in cells}
    assert list(rows) == ["triage", "env", "check_scan", "scan_gpu", "train_step"]
    if triage_missing:
        assert rows["triage"][0] == "missing (benchmarks/triton_triage.py not found)"
    else:
        assert rows["triage"][0] == "ok" and (out / "triage" / "triage.md").exists()
    assert rows["env"][0] == "ok" and rows["env"][2] == "env ran / fine"  # a '|' in a key would break the table
    assert rows["check_scan"][0] == "failed (exit 3)" and rows["check_scan"][2] == "check_scan_gpu ran / fine"
    assert rows["scan_gpu"][0] == "timed out after 1 s" and rows["scan_gpu"][2] == ""
    assert rows["train_step"][0] == "ok"
    assert summary in result.stdout  # the summary is printed last
    assert result.stdout.endswith(summary)
    log = (out / "steps.log").read_text()
    assert log.index("################ env: ok") < log.index("################ check_scan: failed (exit 3)")
    expected_files = {"steps.log", "summary.md", "train_step.json", "train_step.md"}
    if not triage_missing:
        expected_files.add("triage")
    assert {p.name for p in out.iterdir()} == expected_files


def test_gpu_all_skips_steps_once_the_budget_is_spent(tmp_path, stub):
    result, calls, out = run_gpu_all(tmp_path, stub, GPU_ALL_BUDGET_S="3")
    assert result.returncode == 0, result.stderr
    assert calls == []  # a step needs at least 5 s of budget left
    assert "| train_step | skipped: overall budget spent | 0 |" in (out / "summary.md").read_text()
