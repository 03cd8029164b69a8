"""The Triton scan kernels compile for A100 (sm_80) and H100 (sm_90) without spills, on a machine without a GPU.

``benchmarks/triton_compile_report.py`` records the launches the real launch code makes at the model's shapes
(zigzag8_b1_pe2: D 1536, N 16; B 32 / L 1024 and B 4 / L 4096; bf16 and fp32; default ``TritonScanConfig``), compiles
them with Triton's compiler for each target and reads registers, spills, stack and shared memory from the cubins. It
runs in a subprocess because this session's other tests import the kernels in Triton's interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="compiling the Triton kernels needs the triton package (requirements-gpu.txt)")

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import triton_compile_report as report  # noqa: E402

EXPECTED = {  # kernel -> the variants (tiles column) at least one model shape launches
    "_fwd_local_kernel",
    "_fwd_kernel",
    "_bwd_local_kernel",
    "_bwd_kernel",
    "_state_passing_kernel REVERSE=False",
    "_state_passing_kernel REVERSE=True",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if report.cuda_tools() is None:
        pytest.skip("the Triton wheel has no CUDA backend tools (backends/nvidia/bin/cuobjdump)")
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_compile_report.py"), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _name(row):
    reverse = [t for t in row["tiles"].split(",") if t.startswith("REVERSE=")]
    return " ".join([row["kernel"], *reverse])


@pytest.mark.parametrize("target", list(report.TARGETS))
def test_every_kernel_compiles_for_the_target(rows, target):
    for dtype in ("bfloat16", "float32"):
        names = {_name(r) for r in rows if r["target"] == target and r["dtype"] == dtype}
        assert names == EXPECTED, (target, dtype)
    assert any("DETERMINISTIC=True" in r["tiles"] for r in rows if r["target"] == target)


def test_no_spills_and_backward_within_128_registers(rows):
    spilling = [r for r in rows if r["spill_st"] or r["spill_ld"] or r["stack"] or r["local"]]
    assert not spilling, report.format_table(spilling)
    heavy = [r for r in rows if r["regs"] > 128]
    assert not heavy, report.format_table(heavy)


def test_forward_loop_has_no_barrier(rows):
    """The default one-warp forward reduces each step's output by shuffles: no shared-memory round trip per step."""
    forward = [r for r in rows if r["kernel"] in ("_fwd_kernel", "_fwd_local_kernel")]
    assert forward and all(r["barriers"] == 0 for r in forward), report.format_table(forward)
