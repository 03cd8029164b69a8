"""``benchmarks/triton_triage.py``: its --smoke run (same code paths, tiny shapes, interpreter) and its no-GPU exit.

The smoke run is a subprocess because the script must set TRITON_INTERPRET before Triton is first imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the triage script needs the triton package (requirements-gpu.txt)")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_triage.py"


def test_triage_smoke_runs_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "triage.json").read_text())
    assert (tmp_path / "triage.md").read_text().startswith("# Triton scan triage")
    for part in ("probe", "sweep", "split"):
        assert results[part]["error"] is None, (part, results[part]["error"])
    probe = results["probe"]["rows"]
    assert {r["reverse"] for r in probe} == {False, True} and all(r["ok"] for r in probe), probe
    sweep = results["sweep"]["rows"]
    assert sweep[0]["config"] == "default vs torch backend" and sweep[0]["max_rel_diff"] < 1e-4, sweep[0]
    assert all("error" not in r and r["max_rel_diff"] < 1e-4 for r in sweep), sweep
    what = {r["what"] for r in results["split"]["rows"]}
    assert {"backward, atomics", "backward, deterministic"} <= what, what


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_triage_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import triton_triage

    assert triton_triage.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        "triton_triage: no CUDA device; nothing to triage (use --smoke for the interpreter run)"
    )
    assert not any(tmp_path.iterdir())
