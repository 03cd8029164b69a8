"""GPU selective-scan benchmark: zigma's Triton kernel vs zigma's torch backend vs mambapy's pscan (vs mamba_ssm's CUDA
``selective_scan_fn`` when importable), with the HBM floor of mamba-kernels.md §12.

Every backend computes the same function on the same inputs (mamba_ssm contract, model-like: softplus(Δ + dt bias),
D skip, SiLU(z) gate, channel-last (B, D, L) views). Each output is checked against the torch backend before timing.
Times are CUDA-event medians over ``--repeats`` after ``--warmup`` runs (spread = min..max); peak memory is the peak
allocated during fwd+bwd above what was allocated before (the inputs).

HBM floor (estimate, H100 at 3.0 TB/s; e = bytes per activation element, 2 for bf16), bytes per token:

    forward  = 4·e·D (read u, Δ, z; write out) + 2·N·e (read B, C) + e·D (the ungated out saved for backward)
    backward = 8·e·D (read u, Δ, z, out, dout; write du, dΔ, dz) + 2·N·e (B, C) + 2·N·4 (fp32 dB, dC)
    floor ms = batch · L · bytes / 3.0e12 · 1e3          (D 1536, N 16, L 1024: 5.3 + 8.5 = 13.7 µs per sequence)

    python3 benchmarks/scan_gpu.py                          # B=32/L=1024 and B=4/L=4096, D=1536, N=16, bf16
    python3 benchmarks/scan_gpu.py --backends triton torch --repeats 20
    python3 benchmarks/scan_gpu.py --device cpu --small     # smoke test on CPU (Triton interpreter), tiny shapes

The torch backend's output is the reference of every row; without ``torch`` in ``--backends`` it is computed once
(forward only) and not timed. Each shape ends with a ``KEY:`` line (Triton fwd+bwd vs the floor and vs pscan).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BACKENDS = ("triton", "torch", "pscan", "cuda")
FULL_SHAPES = ((32, 1024, 1536, 16), (4, 4096, 1536, 16))  # (B, L, D, N)
SMALL_SHAPES = ((2, 33, 32, 8), (1, 70, 16, 4))
HBM_BYTES_PER_S = 3.0e12


def hbm_floor_ms(batch: int, seqlen: int, dim: int, dstate: int, elem_bytes: int) -> tuple[float, float]:
    """(forward with out saved, forward + backward) HBM floor in ms; see the module docstring."""
    fwd = 4 * elem_bytes * dim + 2 * dstate * elem_bytes + elem_bytes * dim
    bwd = 8 * elem_bytes * dim + 2 * dstate * elem_bytes + 2 * dstate * 4
    to_ms = batch * seqlen / HBM_BYTES_PER_S * 1e3
    return fwd * to_ms, (fwd + bwd) * to_ms


def pscan_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's Blelloch ``pscan`` ((B, L, D, N) layout, fp32) wrapped to the same contract."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    dt = F.softplus(delta.float() + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    x = u.float().transpose(1, 2)  # (B, L, D)
    delta_a = (dt.unsqueeze(-1) * A).exp()  # (B, L, D, N)
    bx = dt.unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)  # (B, L, D, N)
    hs = pscan(delta_a, bx)  # (B, L, D, N)
    y = (hs @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x  # (B, L, D)
    return (y * F.silu(z.float().transpose(1, 2))).transpose(1, 2).to(u.dtype)  # (B, D, L)


def backend_fn(name):
    """The backend as ``f(u, delta, A, B, C, D, z, delta_bias) -> out``, or None where it cannot be imported."""
    if name == "triton":
        from zigma.ops.triton_scan import selective_scan_triton

        return lambda *a: selective_scan_triton(*a, delta_softplus=True)
    if name == "torch":
        from zigma.ops import selective_scan_torch

        return lambda *a: selective_scan_torch(*a, delta_softplus=True)
    if name == "pscan":
        try:
            import mambapy.pscan  # noqa: F401
        except ImportError:
            return None
        return pscan_scan
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken build raising at import time
        return None
    return lambda *a: selective_scan_fn(*a, delta_softplus=True)


class Timer:
    """CUDA events on a GPU, perf_counter on CPU; ``peak_mb`` is the allocation peak above the starting point."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"

    def measure(self, fn, warmup, repeats):
        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), min(times), max(times)

    def peak_mb(self, fn):
        torch = self.torch
        if not self.cuda:
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(shape, backends, dtype, device, timer, warmup, repeats) -> dict:
    """Per backend: ((fwd median, min, max) ms, (fwd+bwd ...) ms, peak MB, max abs diff vs torch), or a reason string.

    The torch backend runs first: its output is the baseline every other backend is checked against before timing.
    """
    import torch
    from check_scan_gpu import model_like_inputs  # benchmarks/ is sys.path[0] when run as a script

    batch, seqlen, dim, dstate = shape
    inputs = model_like_inputs(batch, seqlen, dim, dstate, dtype, device=device)
    grad = torch.randn(batch, dim, seqlen, device=device, generator=torch.Generator(device).manual_seed(1)).to(dtype)
    baseline = None
    rows = {}
    for name in ("torch", *[b for b in backends if b != "torch"]):
        fn = backend_fn(name)
        if fn is None or (name == "cuda" and device != "cuda"):
            rows[name] = "not available"
            continue

        def fwd(fn=fn):
            return fn(*inputs)

        def fwd_bwd(fn=fn):
            for x in inputs:
                x.grad = None
            fn(*inputs).backward(grad)

        try:
            with torch.no_grad():
                out = fwd()
            diff = float("nan") if baseline is None else (out.float() - baseline.float()).abs().max().item()
            baseline = out if baseline is None else baseline
            del out
            if name not in backends:  # the torch reference only
                continue
            rows[name] = (timer.measure(fwd, warmup, repeats), timer.measure(fwd_bwd, warmup, repeats),
                          timer.peak_mb(fwd_bwd), diff)  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            rows[name] = "OOM"
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help=f"tiny shapes {SMALL_SHAPES} (smoke test)")
    parser.add_argument("--shapes", nargs="*", default=None, help="B,L,D,N (default: the two issue shapes)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before zigma.ops.triton_scan (and its kernels) is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scan_gpu: no CUDA device; run with --device cpu --small for a CPU smoke test")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        shapes = list(SMALL_SHAPES if args.small else FULL_SHAPES)
    warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (10 if args.device == "cuda" else 1)
    timer = Timer(args.device)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"# selective scan fwd / fwd+bwd, {args.dtype}, {device_name}, torch {torch.__version__}, "
          f"triton {triton_version}, CUDA {torch.version.cuda}, commit {_commit()}")  # fmt: skip
    print(f"# median of {repeats} after {warmup} warm-up (spread min..max); floor = HBM floor at 3.0 TB/s (H100)")
    print("| B | L | D | N | backend | fwd ms | fwd+bwd ms | peak MB | floor fwd+bwd ms | x floor "
          "| speed-up vs pscan | max abs diff vs torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        batch, seqlen, dim, dstate = shape
        _, floor = hbm_floor_ms(batch, seqlen, dim, dstate, dtype.itemsize)
        rows = bench_shape(shape, args.backends, dtype, args.device, timer, warmup, repeats)
        pscan_ms = rows["pscan"][1][0] if isinstance(rows.get("pscan"), tuple) else None
        for name in args.backends:
            row = rows.get(name)
            prefix = f"| {batch} | {seqlen} | {dim} | {dstate} | {name} |"
            if not isinstance(row, tuple):
                print(f"{prefix} {row} | | | {floor:.4g} | | | |")
                continue
            (f_med, f_lo, f_hi), (b_med, b_lo, b_hi), peak, diff = row
            speedup = f"{pscan_ms / b_med:.2f}x" if pscan_ms else "-"
            diff_s = "baseline" if name == "torch" else f"{diff:.2e}"
            print(f"{prefix} {f_med:.3f} ({f_lo:.3f}..{f_hi:.3f}) | {b_med:.3f} ({b_lo:.3f}..{b_hi:.3f}) | "
                  f"{peak:.0f} | {floor:.4g} | {b_med / floor:.1f}x | {speedup} | {diff_s} |")  # fmt: skip
        triton_row = rows.get("triton")
        if isinstance(triton_row, tuple):
            b_med = triton_row[1][0]
            vs_pscan = f", {pscan_ms / b_med:.1f}x faster than pscan" if pscan_ms else ", pscan n/a"
            print(f"KEY: B{batch} L{seqlen} triton fwd+bwd {b_med:.3f} ms = {b_med / floor:.1f}x floor{vs_pscan}")
        else:
            print(f"KEY: B{batch} L{seqlen} triton {triton_row}")


if __name__ == "__main__":
    main()
