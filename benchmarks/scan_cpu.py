"""CPU selective-scan benchmark: zigma's ``torch`` backend vs a naive sequential loop vs mambapy's ``pscan``, and vs
the ``torch`` backend as it was at commit c37874f (before the chunk-parallel path of issue 12).

All compute the same function on identical inputs (mamba_ssm contract: softplus(Δ + bias), D skip, SiLU(z)
gate), fp32, forward + backward. Each (shape, implementation) runs in a fresh subprocess so that its peak memory
(peak RSS growth over the RSS after the inputs were made) belongs to it alone; time is the median of repeats after
one warm-up; with ``--rounds R`` all implementations run R times, interleaved, and each keeps its best round (on a
shared machine the least disturbed one). Implementations:

* ``naive_loop``: ``zigma.ops.selective_scan_ref``;  ``mambapy_pscan``: mambapy's Blelloch scan.
* ``zigma_torch``: the torch backend as CPU runs it (sequential loop inside cache-sized blocks).
* ``zigma_torch_parallel``: the same backend forced onto its chunk-parallel path (the CUDA default), for reference.
* ``zigma_torch_c37874f``: ``zigma/ops/torch_scan.py`` read from git at commit c37874f (``git show``) and run as a
  temporary module, its custom ops renamed to the ``zigma_baseline`` namespace.

    python benchmarks/scan_cpu.py                 # the two issue shapes, prints a table
    python benchmarks/scan_cpu.py --repeats 3 --shapes 2,128,64,16
    python benchmarks/scan_cpu.py --shapes 32,128,512,16 --impls zigma_torch zigma_torch_c37874f --rounds 3

Targets: (issue 2) at both shapes >= 1.5x faster than the faster of naive_loop / mambapy_pscan with <= 0.5x the
peak memory of the leaner; (issue 12) zigma_torch no slower than zigma_torch_c37874f.
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
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "c37874f"
BASELINE = f"zigma_torch_{BASELINE_COMMIT}"
IMPLS = ("naive_loop", "mambapy_pscan", "zigma_torch", "zigma_torch_parallel", BASELINE)
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


def _baseline_scan():
    """``selective_scan_torch`` of zigma/ops/torch_scan.py at BASELINE_COMMIT, loaded from git as a temporary module."""
    path = "zigma/ops/torch_scan.py"
    show = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if show.returncode != 0:
        sys.exit(f"cannot read {path} at commit {BASELINE_COMMIT} (needs the git history): {show.stderr.strip()}")
    source = show.stdout.replace('"zigma::', '"zigma_baseline::')  # its ops must not clash with the current ones
    module = types.ModuleType(f"torch_scan_{BASELINE_COMMIT}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{BASELINE_COMMIT}:{path}", "exec"), module.__dict__)
    return module.selective_scan_torch


def _function(impl):
    from zigma.ops import selective_scan_ref, selective_scan_torch

    if impl == "naive_loop":
        return lambda *a: selective_scan_ref(*a, delta_softplus=True)
    if impl == "zigma_torch":
        return lambda *a: selective_scan_torch(*a, delta_softplus=True)
    if impl == "zigma_torch_parallel":
        return lambda *a: selective_scan_torch(*a, delta_softplus=True, chunk_parallel=True)
    if impl == BASELINE:
        baseline = _baseline_scan()
        return lambda *a: baseline(*a, delta_softplus=True)
    return _pscan_scan


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(impl: str, shape: tuple[int, ...], repeats: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
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


def run_one(impl, shape, repeats, threads) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--shapes", ",".join(map(str, shape)), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of_rounds(impls, shape, repeats, threads, rounds) -> dict:
    """impl -> result of its fastest round; rounds interleave the implementations."""
    best = {}
    for _ in range(rounds):
        for impl in impls:
            row = run_one(impl, shape, repeats, threads)
            if impl not in best or row["ms"] < best[impl]["ms"]:
                best[impl] = row
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=None, help="B,L,D,N (default: the two issue shapes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="*", choices=IMPLS, default=list(IMPLS), help="default: all")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each implementation's best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES)
    if args.child:
        print(json.dumps(child(args.child, shapes[0], args.repeats, args.threads)))
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"# selective scan fwd+bwd, fp32, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{threads} threads, median of {args.repeats}, best of {args.rounds} interleaved rounds")  # fmt: skip
    print(
        "| B | L | D | N | implementation | fwd+bwd ms | peak MB | speed-up vs faster baseline "
        f"| memory vs leaner baseline | time vs {BASELINE} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    impls = [impl for impl in IMPLS if impl in args.impls]
    verdicts = []
    for shape in shapes:
        rows = best_of_rounds(impls, shape, args.repeats, args.threads, args.rounds)
        ref = rows[impls[0]]["checksum"]
        for impl in impls[1:]:  # same function: compare checksums of output and grads
            diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(rows[impl]["checksum"], ref))
            if diff > 1e-3:
                print(f"WARNING: {impl} disagrees with {impls[0]} at {shape} (rel. checksum diff {diff:.2e})")
        baselines = [rows[b] for b in ("naive_loop", "mambapy_pscan") if b in rows]
        fastest = min((r["ms"] for r in baselines), default=float("nan"))
        leanest = min((r["peak_mb"] for r in baselines), default=float("nan"))
        before = rows[BASELINE]["ms"] if BASELINE in rows else float("nan")
        for impl in impls:
            r = rows[impl]
            print(f"| {' | '.join(map(str, shape))} | {impl} | {r['ms']:.1f} | {r['peak_mb']:.0f} | "
                  f"{fastest / r['ms']:.2f}x | {r['peak_mb'] / leanest:.2f}x | {r['ms'] / before:.2f} |")  # fmt: skip
        if "zigma_torch" in rows and baselines:
            ours = rows["zigma_torch"]
            ok = fastest / ours["ms"] >= 1.5 and ours["peak_mb"] <= 0.5 * leanest
            verdicts.append(f"issue 2 target (>=1.5x faster, <=0.5x memory) at {shape}: {'MET' if ok else 'NOT MET'}")
        if "zigma_torch" in rows and BASELINE in rows:
            ratio = rows["zigma_torch"]["ms"] / before
            verdicts.append(f"issue 12: zigma_torch / {BASELINE} time at {shape}: {ratio:.2f}")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
