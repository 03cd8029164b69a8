"""First look at the Triton scan on a lent GPU: reverse-scan probe, tiling sweep, per-kernel time split.

    python3 benchmarks/triton_triage.py --out DIR           # on CUDA (gpu_all.sh runs this first)
    python3 benchmarks/triton_triage.py --out DIR --smoke   # same code paths, tiny shapes, Triton interpreter on CPU

Parts, each guarded (an error is printed and recorded, and the next part runs):

1. ``probe``: ``tl.associative_scan`` with the kernel's affine combine, forward and ``reverse=True`` (the backward's
   adjoint scan; the main risk on Triton 3.6), against a sequential fp64 loop, at T ∈ {32, 64}.
2. ``sweep``: fwd+bwd time of ``TritonScanConfig`` variants at the model shapes (bf16, D 1536, N 16; B 32 / L 1024
   and B 4 / L 4096), each checked against the default config's outputs and gradients; the default config is also
   checked against the ``torch`` backend on a small case.
3. ``split``: per-kernel GPU time of one fwd+bwd at the default config (``torch.profiler``), and the backward with
   atomic vs deterministic reductions (CUDA events, median of repeats).

Writes ``DIR/triage.json`` and ``DIR/triage.md`` and prints the tables. Without CUDA (and without ``--smoke``) it
prints one line and exits 0. Budget: ≈ 120 s on an H100 (the sweep stops early past ``--sweep-budget`` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own library functions are jitted then

import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_SHAPES = {"B32_L1024": (32, 1024), "B4_L4096": (4, 4096)}
SMOKE_SHAPES = {"B2_L12": (2, 12)}
SWEEP = [  # (name, TritonScanConfig overrides); "default" first
    ("default", {}),
    ("bwd_c64_d8_w8", dict(chunk_size=64, bwd_block_d=8, bwd_warps=8)),
    ("bwd_c32_d16_w4", dict(bwd_block_d=16, bwd_warps=4)),
    ("bwd_c32_d32_w8", dict(bwd_block_d=32, bwd_warps=8)),
    ("bwd_c32_d8_w4", dict(bwd_block_d=8, bwd_warps=4)),
    ("fwd_d32_w4", dict(fwd_block_d=32, fwd_warps=4, fwd_programs_per_sm=8)),  # the previous forward tiling
    ("fwd_d8_w1", dict(fwd_block_d=8, fwd_warps=1)),
    ("fwd_d16_w2", dict(fwd_block_d=16, fwd_warps=2, fwd_programs_per_sm=12)),
    ("fwd_pps8", dict(fwd_programs_per_sm=8)),
    ("deterministic", dict(deterministic=True)),
]


class Env:
    """Device, dtype, shapes and timer of this run (CUDA, or the interpreter on CPU with --smoke)."""

    def __init__(self, smoke: bool):
        import torch

        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.dim, self.dstate = (8, 2) if smoke else (1536, 16)
        self.shapes = SMOKE_SHAPES if smoke else MODEL_SHAPES
        self.repeats = 0 if smoke else 5

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        """Median wall time of ``fn`` over the repeats after one warm-up (synchronised), in ms; one run if 0 repeats."""
        times = []
        if self.repeats:
            fn()
        for _ in range(max(1, self.repeats)):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)


def model_inputs(env: Env, batch: int, seqlen: int, seed: int = 0, requires_grad: bool = True):
    """u, delta, A, B, C, D, z, delta_bias laid out as zigma/mamba.py passes them (transposed (B, L, ·) views)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim, n = env.dim, env.dstate

    def act(c, scale=1.0, shift=0.0):
        x = scale * torch.randn(batch, seqlen, c, generator=gen) + shift
        return x.to(env.dtype).to(env.device).transpose(1, 2)

    xs = [
        act(dim),
        act(dim, 0.5, -1.0),
        -torch.rand(dim, n, generator=gen).add(0.5).to(env.device),
        act(n),
        act(n),
        torch.randn(dim, generator=gen).to(env.device),
        act(dim),
        (0.5 * torch.rand(dim, generator=gen)).to(env.device),
    ]
    return [x.detach().requires_grad_(requires_grad) for x in xs]


def fwd_bwd(fn, inputs, grad_seed=1):
    """out and the gradients of every input for one forward + backward with a fixed random upstream gradient."""
    import torch

    for x in inputs:
        x.grad = None
    out = fn(*inputs, True)
    gen = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device))
    return [out.detach()] + [x.grad for x in inputs]


def max_rel_diff(a_list, b_list) -> float:
    """Largest over tensors of max|a - b| / max|b| (0 when identical)."""
    worst = 0.0
    for a, b in zip(a_list, b_list):
        scale = b.float().abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


# ---- part 1: reverse-scan probe -------------------------------------------------------------------------------------


def _probe_scan(a_ptr, b_ptr, ca_ptr, cb_ptr, T: tl.constexpr, W: tl.constexpr, REVERSE: tl.constexpr):
    """[T, W] tiles: the kernel's associative_scan of affine maps along axis 0 (jitted in part_probe)."""
    offs = tl.arange(0, T)[:, None] * W + tl.arange(0, W)[None, :]
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    ca, cb = tl.associative_scan((a, b), 0, _affine_combine, reverse=REVERSE)
    tl.store(ca_ptr + offs, ca)
    tl.store(cb_ptr + offs, cb)


def part_probe(env: Env) -> list[dict]:
    import torch
    import triton

    from zigma.ops import triton_scan

    global _affine_combine  # the kernel's own combine, resolved when _probe_scan compiles
    _affine_combine = triton_scan._affine_combine
    probe = triton.jit(_probe_scan)  # jitted here: TRITON_INTERPRET is decided by then
    rows = []
    width = 16
    for T in (32, 64) if not env.smoke else (8,):
        gen = torch.Generator().manual_seed(T)
        a = (0.5 + 0.5 * torch.rand(T, width, generator=gen)).to(env.device)
        b = torch.randn(T, width, generator=gen).to(env.device)
        for reverse in (False, True):
            ca, cb = torch.empty_like(a), torch.empty_like(b)
            probe[(1,)](a, b, ca, cb, T=T, W=width, REVERSE=reverse)
            ref_a, ref_b = torch.empty(T, width, dtype=torch.float64), torch.empty(T, width, dtype=torch.float64)
            acc_a, acc_b = torch.ones(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
            order = range(T - 1, -1, -1) if reverse else range(T)
            for t in order:  # h_t = a_t h_prev + b_t, prev = t-1 (forward) or t+1 (reverse)
                acc_a, acc_b = acc_a * a[t].double().cpu(), a[t].double().cpu() * acc_b + b[t].double().cpu()
                ref_a[t], ref_b[t] = acc_a, acc_b
            err = max_rel_diff([ca.cpu(), cb.cpu()], [ref_a, ref_b])
            rows.append(dict(T=T, reverse=reverse, max_rel_err=err, ok=err < 1e-5))
    return rows


# ---- part 2: tiling sweep -------------------------------------------------------------------------------------------


def part_sweep(env: Env, budget_s: float) -> list[dict]:
    from zigma.ops import triton_scan
    from zigma.ops.torch_scan import selective_scan_torch

    rows = []
    small = model_inputs(env, 2, 64 if not env.smoke else 8, seed=3)
    ref = fwd_bwd(selective_scan_torch, [x.detach().float().requires_grad_() for x in small])
    mine = fwd_bwd(triton_scan.selective_scan_triton, [x.detach().float().requires_grad_() for x in small])
    rows.append(dict(shape="small fp32", config="default vs torch backend", max_rel_diff=max_rel_diff(mine, ref)))

    started = time.perf_counter()
    sweep = SWEEP[:2] if env.smoke else SWEEP
    inputs = {name: model_inputs(env, batch, seqlen) for name, (batch, seqlen) in env.shapes.items()}
    baselines = {}
    for name, overrides in sweep:  # every shape per config, so a spent budget cuts configs, not shapes
        for shape_name, xs in inputs.items():
            if time.perf_counter() - started > budget_s:
                rows.append(dict(shape=shape_name, config=name, error=f"skipped: sweep budget {budget_s:.0f} s spent"))
                continue
            try:
                rows.append(_sweep_one(env, name, overrides, shape_name, xs, baselines))
            except Exception as exc:
                rows.append(dict(shape=shape_name, config=name, error=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def _sweep_one(env: Env, name: str, overrides: dict, shape_name: str, inputs, baselines: dict) -> dict:
    """fwd+bwd and no-grad forward time of one config at one shape; outputs/grads against the first config's."""
    import dataclasses

    import torch

    from zigma.ops import triton_scan

    config = dataclasses.replace(triton_scan.TritonScanConfig(), **overrides)

    def train():
        return fwd_bwd(lambda *a: triton_scan.selective_scan_triton(*a, config=config), inputs)

    def sample():
        with torch.no_grad():
            return triton_scan.selective_scan_triton(*inputs, True, config=config)

    result = train()
    baseline = baselines.setdefault(shape_name, result)
    row = dict(shape=shape_name, config=name, max_rel_diff=max_rel_diff(result, baseline))
    if not env.smoke:  # the interpreter's times mean nothing
        row.update(fwd_bwd_ms=env.time_ms(train), fwd_nograd_ms=env.time_ms(sample))
    return row


# ---- part 3: per-kernel time split, atomic vs deterministic ---------------------------------------------------------


def part_split(env: Env) -> list[dict]:
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile

    from zigma.ops import triton_scan

    rows = []
    for shape_name, (batch, seqlen) in env.shapes.items():
        inputs = model_inputs(env, batch, seqlen)
        fwd_bwd(triton_scan.selective_scan_triton, inputs)  # compile outside the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device == "cuda" else [])
        with profile(activities=activities) as prof:
            fwd_bwd(triton_scan.selective_scan_triton, inputs)
            env.sync()
        for event in prof.key_averages():
            device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if env.device == "cuda" and device_us > 0 and "kernel" in event.key.lower():
                rows.append(dict(shape=shape_name, what=event.key, ms=device_us / 1e3, count=event.count))
            elif env.device == "cpu" and event.key.startswith("zigma::"):
                rows.append(dict(shape=shape_name, what=event.key, ms=event.cpu_time_total / 1e3, count=event.count))

        out = triton_scan.selective_scan_triton(*inputs, True)
        grad = torch.randn_like(out)
        for deterministic in (False, True):
            config = dataclasses.replace(triton_scan.TritonScanConfig(), deterministic=deterministic)
            out = triton_scan.selective_scan_triton(*inputs, True, config=config)

            def backward(out=out, inputs=inputs, grad=grad):
                torch.autograd.grad(out, inputs, grad, retain_graph=True)

            what = "backward, deterministic" if deterministic else "backward, atomics"
            rows.append(dict(shape=shape_name, what=what, ms=env.time_ms(backward), count=env.repeats))
        del inputs
    return rows


# ---- driver ---------------------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for triage.json and triage.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's interpreter on CPU")
    parser.add_argument("--sweep-budget", type=float, default=60.0, help="seconds after which the sweep stops")
    args = parser.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton_triage: --smoke must be on the command line (TRITON_INTERPRET=1 is set at import)")
        return 2
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("triton_triage: no CUDA device; nothing to triage (use --smoke for the interpreter run)")
        return 0
    import triton

    env = Env(args.smoke)
    header = f"torch {torch.__version__}, triton {triton.__version__}, device " + (
        torch.cuda.get_device_name() if env.device == "cuda" else "cpu (interpreter)"
    )
    print(f"triton_triage: {header}")
    results: dict = {"header": header}
    parts = [("probe", lambda: part_probe(env)), ("sweep", lambda: part_sweep(env, args.sweep_budget))]
    parts.append(("split", lambda: part_split(env)))
    markdown = [f"# Triton scan triage\n\n{header}\n"]
    for name, part in parts:
        started = time.perf_counter()
        try:
            rows = part()
            error = None
        except Exception as exc:
            traceback.print_exc()
            rows, error = [], f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        results[name] = dict(rows=rows, error=error, seconds=seconds)
        text = f"## {name} ({seconds:.1f} s)" + (f"\n\nERROR: {error}" if error else "") + "\n\n" + _table(rows)
        print(text + "\n")
        markdown.append(text + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for path, content in (
        (args.out / "triage.json", json.dumps(results, indent=1)),
        (args.out / "triage.md", "\n".join(markdown)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)  # never a partial file where a good one was
    return 0


if __name__ == "__main__":
    sys.exit(main())
