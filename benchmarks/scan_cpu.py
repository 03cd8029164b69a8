"""CPU selective-scan benchmark: zigma's ``torch`` backend vs a naive sequential loop vs mambapy's ``pscan``.

All three compute the same function on identical inputs (mamba_ssm contract: softplus(Δ + bias), D skip, SiLU(z)
gate), fp32, forward + backward. Each (shape, implementation) runs in a fresh subprocess so that its peak memory
(peak RSS growth over the RSS after the inputs were made) belongs to it alone; time is the median of repeats after
one warm-up.

    python benchmarks/scan_cpu.py                 # the two issue shapes, prints a table
    python benchmarks/scan_cpu.py --repeats 3 --shapes 2,128,64,16

Target (issue 2): at both shapes >= 1.5x faster than the faster baseline with <= 0.5x the peak memory of the leaner.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("naive_loop", "mambapy_pscan", "zigma_torch")
DEFAULT_SHAPES = ((8, 256, 256, 16), (2, 1024, 512, 16))  # (B, L, D, N)


def _inputs(batch, seqlen, dim, n_state):
    import torch

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, seqlen, dim, generator=gen).transpose(1, 2)  # channel-last, as the model produces
    delta = (0.5 * torch.randn(batch, seqlen, dim, generator=gen)).transpose(1, 2)
    z = torch.randn(batch, seqlen, dim, generator=gen).transpose(1, 2)
    a = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1)
    b = torch.randn(batch, seqlen, n_state, generator=gen).transpose(1, 2)
    c = torch.randn(batch, seqlen, n_state, generator=gen).transpose(1, 2)
    d = torch.ones(dim)
    bias = torch.randn(dim, generator=gen) * 0.1 - 3.0
    return [x.detach().requires_grad_() for x in (u, delta, a, b, c, d, z, bias)]


def _pscan_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's parallel scan (Blelloch, (B, L, D, N) layout) wrapped to the same contract."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    x = u.transpose(1, 2)
    delta_a = (dt.unsqueeze(-1) * A).exp()  # (B, L, D, N)
    bx = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def _function(impl):
    from zigma.ops import selective_scan_ref, selective_scan_torch

    if impl == "naive_loop":
        return lambda *a: selective_scan_ref(*a, delta_softplus=True)
    if impl == "zigma_torch":
        return lambda *a: selective_scan_torch(*a, delta_softplus=True)
    return _pscan_scan


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(impl: str, shape: tuple[int, ...], repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    fn = _function(impl)
    inputs = _inputs(*shape)
    grad = torch.randn(shape[0], shape[2], shape[1], generator=torch.Generator().manual_seed(1))
    before = _peak_rss_mb()
    out = fn(*inputs)
    out.backward(grad)
    peak = _peak_rss_mb() - before
    checksum = [float(out.detach().double().sum())] + [float(x.grad.double().norm()) for x in inputs]
    times = []
    for _ in range(repeats):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        fn(*inputs).backward(grad)
        times.append(time.perf_counter() - start)
    return {"impl": impl, "shape": shape, "ms": 1000 * statistics.median(times), "peak_mb": peak, "checksum": checksum}


def run_one(impl, shape, repeats) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--shapes", ",".join(map(str, shape)), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=None, help="B,L,D,N (default: the two issue shapes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES)
    if args.child:
        print(json.dumps(child(args.child, shapes[0], args.repeats)))
        return

    import torch

    print(f"# selective scan fwd+bwd, fp32, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    header = (
        "| B | L | D | N | implementation | fwd+bwd ms | peak MB "
        "| speed-up vs faster baseline | memory vs leaner baseline |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for shape in shapes:
        rows = {impl: run_one(impl, shape, args.repeats) for impl in IMPLS}
        ref = rows["naive_loop"]["checksum"]
        for impl in ("mambapy_pscan", "zigma_torch"):  # same function: compare checksums of output and grads
            diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(rows[impl]["checksum"], ref))
            if diff > 1e-3:
                print(f"WARNING: {impl} disagrees with the naive loop at {shape} (rel. checksum diff {diff:.2e})")
        fastest = min(rows["naive_loop"]["ms"], rows["mambapy_pscan"]["ms"])
        leanest = min(rows["naive_loop"]["peak_mb"], rows["mambapy_pscan"]["peak_mb"])
        for impl in IMPLS:
            r = rows[impl]
            print(f"| {' | '.join(map(str, shape))} | {impl} | {r['ms']:.1f} | {r['peak_mb']:.0f} | "
                  f"{fastest / r['ms']:.2f}x | {r['peak_mb'] / leanest:.2f}x |")  # fmt: skip
        ours = rows["zigma_torch"]
        verdicts.append((shape, fastest / ours["ms"] >= 1.5 and ours["peak_mb"] <= 0.5 * leanest))
    for shape, ok in verdicts:
        print(f"target (>=1.5x faster, <=0.5x memory) at {shape}: {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
