"""The runtime guard of the Triton scan (zigma/ops/guard.py) and how zigma.ops dispatches on its verdict.

The real guard runs once in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything
imports triton) on CPU tensors, at a reduced shape: the interpreter runs every op in numpy. The broken kernels are
stand-ins patched over ``triton_scan.selective_scan_triton``: one returns wrong numbers, one raises at "compile".
``available_backends`` is patched to offer Triton on the CPU, which the dispatcher otherwise offers on CUDA only.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the triton scan backend needs the triton package (requirements-gpu.txt)")

import zigma.ops as ops
from zigma.ops import ScanBackendError, guard, resolve_backend, selective_scan, selective_scan_torch, triton_scan

# B 1, D 16, L 80, N 4: two chunks of 64 (the second partial), and two forward L splits (one "SM" in the interpreter)
SMALL_SHAPE = (1, 16, 80, 4)


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Empty resolution and guard caches; Triton offered on the CPU; a small guard shape."""
    monkeypatch.setattr(ops, "_RESOLVED", {})
    monkeypatch.setattr(ops, "_GUARDED", {})
    monkeypatch.setattr(ops, "available_backends", lambda device="cpu": ["torch", "triton"])
    monkeypatch.setattr(guard, "GUARD_SHAPE", SMALL_SHAPE)


def wrong_by_ten_percent(*args, **kwargs):
    return selective_scan_torch(*args, **kwargs) * 1.1


def fails_to_compile(*args, **kwargs):
    raise RuntimeError("PassManager::run failed\nsecond line of the compiler log")


def only_bf16_broken(u, *args, **kwargs):
    out = selective_scan_torch(u, *args, **kwargs)
    return out * 1.1 if u.dtype == torch.bfloat16 else out


def inputs(dtype=torch.float32):
    return guard.guard_inputs(torch.device("cpu"), dtype, seed=3)


@pytest.mark.skipif(not triton_scan.INTERPRET, reason="needs Triton's interpreter (TRITON_INTERPRET=1 before import)")
def test_real_guard_passes_in_the_interpreter_and_auto_picks_triton():
    import tests.zigma.ops.test_triton_scan  # noqa: F401  (its import speeds up the interpreter's scans, same results)

    assert resolve_backend("auto", "cpu", torch.float32) == "triton"
    result = ops._GUARDED[(torch.device("cpu"), torch.float32)]
    assert result.ok and result.detail == "ok" and result.seconds > 0
    print(f"guard in the interpreter at {SMALL_SHAPE}: {result.seconds:.2f} s")
    assert resolve_backend("triton", "cpu", torch.float32) == "triton"  # cached: the check ran once
    assert len(ops._GUARDED) == 1


@pytest.mark.parametrize(
    ("kernel", "detail"),
    [(wrong_by_ten_percent, r"out: max abs err [0-9.e+-]+, max rel err 1\.000e-01 \(\d+ of 1280 outside rtol 0\.0006,"),
     (fails_to_compile, r"RuntimeError: PassManager::run failed\)")],
    ids=["wrong-numbers", "compile-error"],
)  # fmt: skip
def test_broken_kernel_auto_warns_once_and_falls_back_explicit_triton_raises(monkeypatch, kernel, detail):
    monkeypatch.setattr(triton_scan, "selective_scan_triton", kernel)
    x = inputs()
    with pytest.warns(RuntimeWarning, match=r"failed its self-check on cpu torch.float32 \(" + detail) as record:
        out = selective_scan(*x, delta_softplus=True, backend="auto")
        again = selective_scan(*x, delta_softplus=True, backend="auto")
    assert len(record) == 1  # one warning, however many calls
    assert "using the torch backend for cpu torch.float32 instead" in str(record[0].message)
    assert "second line" not in str(record[0].message)
    expected = selective_scan_torch(*x, delta_softplus=True)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    with pytest.raises(ScanBackendError, match=r"^scan_backend='triton': the Triton selective scan failed its self"):
        selective_scan(*x, delta_softplus=True, backend="triton")
    assert len(ops._GUARDED) == 1  # the explicit request reused the verdict


def test_guard_is_per_dtype(monkeypatch):
    monkeypatch.setattr(triton_scan, "selective_scan_triton", only_bf16_broken)
    assert resolve_backend("auto", "cpu", torch.float32) == "triton"
    with pytest.warns(RuntimeWarning, match="on cpu torch.bfloat16"):
        assert resolve_backend("auto", "cpu", torch.bfloat16) == "torch"
    assert resolve_backend("auto", "cpu") == "triton"  # the device-level answer runs no guard


def test_non_finite_output_fails_the_guard(monkeypatch):
    monkeypatch.setattr(triton_scan, "selective_scan_triton", lambda *a, **k: selective_scan_torch(*a, **k) * torch.nan)
    result = guard.check_triton_scan("cpu", torch.float32)
    assert not result.ok and result.detail == "out: 1280 non-finite values"


def test_guard_ignores_callers_inference_mode_and_autocast(monkeypatch):
    """Resolution can first happen inside sampling (inference mode) under bf16 autocast: the check still runs its
    backward, in fp32 for fp32 inputs."""
    monkeypatch.setattr(triton_scan, "selective_scan_triton", selective_scan_torch)  # a kernel equal to the oracle
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        result = guard.check_triton_scan("cpu", torch.float32)
    assert result.ok, result.detail


def test_mark_is_what_assume_constant_result_sets():
    def probe():
        return 0

    torch.compiler.assume_constant_result(probe)
    marks = {k for k in vars(probe) if k.startswith("_dynamo")}
    assert marks == {"_dynamo_marked_constant"}
    assert ops._chosen_backend._dynamo_marked_constant is True


def test_compiled_call_resolves_eagerly_at_trace_time_in_one_graph(monkeypatch):
    """No eager call first: the guard runs while Dynamo traces, once, and the fallback is baked into one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    calls = []

    def counting_broken(*args, **kwargs):
        calls.append(args[0].dtype)
        return wrong_by_ten_percent(*args, **kwargs)

    monkeypatch.setattr(triton_scan, "selective_scan_triton", counting_broken)
    x = inputs()
    counter = CompileCounterWithBackend("aot_eager")

    def scan_squared(*tensors):
        return selective_scan(*tensors, delta_softplus=True, backend="auto") ** 2

    torch._dynamo.reset()
    try:
        with pytest.warns(RuntimeWarning, match="self-check on cpu torch.float32") as record:
            out = torch.compile(scan_squared, fullgraph=True, backend=counter)(*x)
            out = torch.compile(scan_squared, fullgraph=True, backend=counter)(*x)  # cached: no second check
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1 and len(record) == 1 and calls == [torch.float32]
    assert torch.equal(out, selective_scan_torch(*x, delta_softplus=True) ** 2)


@pytest.mark.skipif(not torch.cuda.is_available() or triton_scan.INTERPRET, reason="needs a GPU (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_real_guard_passes_on_the_gpu_at_its_full_shape(monkeypatch, dtype):
    monkeypatch.undo()  # the module's GUARD_SHAPE, not the fixture's small one
    result = guard.check_triton_scan("cuda", dtype)
    assert result.ok, result.detail
