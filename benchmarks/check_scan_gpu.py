"""GPU correctness check of the Triton selective scan (``zigma/ops/triton_scan.py``), compiled kernels on a real card.

First the cost of the runtime guard (``zigma/ops/guard.py``): wall time of ``check_triton_scan`` per dtype on its first
call in this process (kernel compilation included unless Triton's disk cache already holds them; gpu_all.sh gives
this step an empty cache) and on a repeat (the check alone), with its verdict. Then two parts, both fwd + bwd with one
shared upstream gradient, printing max/mean abs diffs per tensor and PASS/FAIL:

1. small shapes (odd L, partial chunks and D blocks, every option, L splits) against ``selective_scan_ref``, fp32;
2. full shapes (B=32, L=1024 and B=4, L=4096; D=1536, N=16) in bf16 and fp32 against zigma's ``torch`` backend on the
   same inputs (model-like: channel-last views, S4D-real A, softplus(Δ + dt bias), D skip, SiLU(z) gate).

Tolerances are mamba_ssm's (tests/ops/test_selective_scan.py): fp32 6e-4/2e-3, bf16 3e-2/5e-2 for outputs; weight grads
1e-3/1e-3 raised to the input tolerances with z; du x2, dΔ x5/x10, dA atol x5, variable dB/dC at input tolerances.

    python3 benchmarks/check_scan_gpu.py                 # guard, both parts; exit status 1 if anything fails
    python3 benchmarks/check_scan_gpu.py --part full --dtypes bf16
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zigma.ops.guard import NAMES, TOLERANCES, gradient_tolerances  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_SHAPES = ((32, 1024, 1536, 16), (4, 4096, 1536, 16))  # (B, L, D, N)
# (B, L, D, N, has_D, has_z, has_bias, softplus, chunk_size, l_split, layout); layout "model" = as zigma/mamba.py
# passes them, "contiguous" = every (B, ., L) tensor contiguous and B, C as (B, 1, N, L)
SMALL_CASES = (
    (2, 37, 24, 8, True, True, True, True, 16, 2, "model"),
    (2, 17, 8, 4, False, False, False, False, 8, 1, "contiguous"),
    (2, 1, 16, 4, True, False, False, True, 64, 0, "model"),
    (2, 33, 40, 5, False, True, True, False, 8, 3, "contiguous"),
    (1, 300, 96, 16, True, True, True, True, 64, 0, "model"),
    (3, 1000, 64, 16, True, True, True, True, 64, 4, "contiguous"),
    (1, 129, 16, 16, True, False, True, True, 128, 1, "model"),
)


def model_like_inputs(
    batch, seqlen, dim, dstate, dtype, *, has_d=True, has_z=True, has_bias=True, seed=0, device="cuda"
):
    """Inputs laid out as ``zigma/mamba.py`` passes them: u (B, D, L) contiguous (the conv output); Δ, z (B, D, L)
    views of (B, L, D) tensors; B, C (B, N, L) views of slices of one (B, L, R + 2N) ``x_proj`` output; S4D-real A;
    dt bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1] (mamba_simple.py)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, generator=gen)).to(dtype)

    dt_rank = math.ceil(dim / 32)  # ceil(d_model / 16) with d_inner = 2 d_model
    u = randn(batch, dim, seqlen)
    delta = randn(batch, seqlen, dim, scale=0.5).transpose(1, 2)
    x_dbl = randn(batch, seqlen, dt_rank + 2 * dstate)
    B = x_dbl[..., dt_rank : dt_rank + dstate].transpose(1, 2)
    C = x_dbl[..., dt_rank + dstate :].transpose(1, 2)
    A = -torch.arange(1, dstate + 1, dtype=torch.float32, device=device).repeat(dim, 1)
    D = torch.ones(dim, device=device) if has_d else None
    z = randn(batch, seqlen, dim).transpose(1, 2) if has_z else None
    bias = None
    if has_bias:
        dt = torch.exp(torch.rand(dim, device=device, generator=gen) * math.log(100.0) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))
    return [x.detach().requires_grad_() if x is not None else None for x in (u, delta, A, B, C, D, z, bias)]


def small_case_inputs(batch, seqlen, dim, dstate, has_d, has_z, has_bias, softplus, layout, device="cuda"):
    """fp32 inputs for the reference comparison: random A in [-8.5, -0.5]; without softplus Δ, bias ~ 0.5·U[0, 1]
    (as mamba_ssm's test) so that Δ + bias stays positive."""
    inputs = model_like_inputs(batch, seqlen, dim, dstate, torch.float32, has_d=has_d, has_z=has_z,
                               has_bias=has_bias, seed=seqlen, device=device)  # fmt: skip
    with torch.no_grad():
        inputs[2].copy_(-0.5 - 8 * torch.rand_like(inputs[2]))
        if not softplus:
            inputs[1].copy_(0.5 * torch.rand_like(inputs[1]))
            if has_bias:
                inputs[7].copy_(0.5 * torch.rand_like(inputs[7]))
    if layout == "contiguous":
        inputs = [x.detach().contiguous().requires_grad_() if x is not None and x.dim() == 3 else x for x in inputs]
        inputs[3], inputs[4] = (x.detach().unsqueeze(1).requires_grad_() for x in inputs[3:5])
    return inputs


def run(fn, inputs, softplus, grad, **kw):
    """fwd + bwd of ``fn`` on fresh leaf copies of ``inputs``; returns out, last_state and the grads."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]  # keeps stride order
    out, last = fn(*leaves, softplus, True, **kw)
    out.backward(grad)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out.detach(), last, [x.grad if x is not None else None for x in leaves]


def compare(label, name, actual, expected, rtol, atol) -> bool:
    diff = (actual.float() - expected.float()).abs()
    ok = bool(torch.isclose(actual.float(), expected.float(), rtol=rtol, atol=atol).all())
    bad = int((~torch.isclose(actual.float(), expected.float(), rtol=rtol, atol=atol)).sum())
    print(
        f"| {label} | {name} | {diff.max().item():.3e} | {diff.mean().item():.3e} | "
        f"{expected.float().abs().max().item():.3e} | {rtol:g}/{atol:g} | {'PASS' if ok else f'FAIL ({bad} elems)'} |"
    )
    return ok


def check(label, inputs, softplus, baseline, **kw) -> bool:
    """Triton vs ``baseline`` on the same inputs: out, last_state, every gradient, mamba_ssm's tolerances."""
    from zigma.ops.triton_scan import selective_scan_triton

    dtype = inputs[0].dtype
    out_shape = inputs[0].shape
    device = inputs[0].device
    grad = torch.randn(out_shape, device=device, generator=torch.Generator(device).manual_seed(1)).to(dtype)
    start = time.perf_counter()
    out, last, grads = run(selective_scan_triton, inputs, softplus, grad, **kw)
    t_triton = time.perf_counter() - start
    start = time.perf_counter()
    out_ref, last_ref, grads_ref = run(baseline, inputs, softplus, grad)
    t_base = time.perf_counter() - start
    print(f"| {label} | (wall s: triton {t_triton:.2f} incl. compile, baseline {t_base:.2f}) | | | | | |")
    rtol, atol = TOLERANCES[dtype]
    grad_tol = gradient_tolerances(dtype, has_z=inputs[6] is not None)
    ok = compare(label, "out", out, out_ref, rtol, atol)
    ok &= compare(label, "last_state", last, last_ref, rtol, atol)
    ok &= bool(torch.isfinite(out).all())
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        if g is not None:
            ok &= compare(label, f"d{name}", g, g_ref, *grad_tol[name])
    return ok


def guard_cost(dtypes) -> bool:
    """Time the runtime guard per dtype, first call then a repeat, and print its verdicts; True if all passed."""
    from zigma.ops.guard import check_triton_scan

    device = torch.device("cuda", torch.cuda.current_device())
    ok, keys = True, []
    for name in dtypes:
        first = check_triton_scan(device, DTYPES[name])
        repeat = check_triton_scan(device, DTYPES[name])
        print(f"| guard {name} | first call {first.seconds:.3f} s | repeat {repeat.seconds:.3f} s | | | | "
              f"{'PASS' if first.ok else 'FAIL: ' + first.detail} |")  # fmt: skip
        keys.append(
            f"guard {name} {'ok' if first.ok else 'FAILED'} {first.seconds:.2f} s first, {repeat.seconds:.3f} s repeat"
        )
        ok &= first.ok and repeat.ok
    print("KEY: " + "; ".join(keys))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "guard", "small", "full"), default="all")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "check_scan_gpu: no CUDA device; this script checks the compiled Triton kernels on a GPU "
            "(the CPU interpreter tests are tests/zigma/ops/test_triton_scan.py)"
        )
    import triton

    from zigma.ops import selective_scan_ref, selective_scan_torch

    print(f"# Triton selective scan check on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}")  # fmt: skip
    print("| case | tensor | max abs diff | mean abs diff | max abs ref | rtol/atol | verdict |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    if args.part in ("all", "guard"):
        ok &= guard_cost(args.dtypes)
    failed = []
    if args.part in ("all", "small"):
        for batch, seqlen, dim, dstate, has_d, has_z, has_bias, softplus, chunk, split, layout in SMALL_CASES:
            inputs = small_case_inputs(batch, seqlen, dim, dstate, has_d, has_z, has_bias, softplus, layout)
            options = f"D{has_d:d}z{has_z:d}b{has_bias:d}s{softplus:d}"
            label = f"ref B{batch} L{seqlen} D{dim} N{dstate} T{chunk} S{split} {options} {layout}"
            passed = check(label, inputs, softplus, selective_scan_ref, chunk_size=chunk, l_split=split)
            ok &= passed
            failed += [] if passed else [label]
    if args.part in ("all", "full"):
        for dtype_name in args.dtypes:
            for batch, seqlen, dim, dstate in FULL_SHAPES:
                inputs = model_like_inputs(batch, seqlen, dim, dstate, DTYPES[dtype_name])
                label = f"torch {dtype_name} B{batch} L{seqlen} D{dim} N{dstate}"
                passed = check(label, inputs, True, selective_scan_torch)
                ok &= passed
                failed += [] if passed else [label]
                del inputs
                torch.cuda.empty_cache()
    print(f"\nOVERALL: {'PASS' if ok else 'FAIL'}")
    print(
        f"KEY: scan check {'PASS' if ok else 'FAIL'}"
        + (f" ({len(failed)} cases failed: {', '.join(failed)})" if failed else "")
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
