"""Compile the Triton scan kernels for A100/H100 on a machine without a GPU and report registers, spills, shared memory.

Nothing is launched and no driver is needed. The real Python launch code of :mod:`zigma.ops.triton_scan` runs on
``meta`` tensors with the model's shapes and strides while a stand-in Triton driver reports the target GPU; a Triton
cache hook records each launch's exact specialisation (the launcher's "equal to 1" / "divisible by 16" rules applied to
the real integer arguments, constexprs, warps) and skips the launch. Each recorded launch is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, and ``cuobjdump -res-usage`` (shipped in the
Triton wheel) reads registers, stack and shared memory from the cubin; spill stores/loads are the ``STL``/``LDL``
instructions of the SASS (``cuobjdump -sass``); ``bar.sync`` counts the barriers in the PTX; progs/SM is the resident
programs per SM that registers, warps and shared memory allow.

    python benchmarks/triton_compile_report.py                  # default configs, sm_80 + sm_90, bf16 + fp32
    python benchmarks/triton_compile_report.py --sweep          # also the backward tiling sweep (slow)
    python benchmarks/triton_compile_report.py --json out.json  # rows as JSON too

Must run with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``s); ``tests/zigma/
test_triton_compile.py`` runs it in a subprocess. Works on Triton 3.6 and 3.8 (``knobs.runtime.jit_cache_hook``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (name, cc, SM count) of the targets; register file 64K x 32-bit, at most 64 resident warps and 32 blocks per SM.
TARGETS = {"sm_80": (80, 108), "sm_90": (90, 132)}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}

# Model shapes (zigzag8_b1_pe2: d_model 768, d_inner 1536, d_state 16, dt_rank 48; x_proj rows of 48 + 2·16).
MODEL = dict(dim=1536, dstate=16, dt_rank=48)
SHAPES = {"B32_L1024": (32, 1024), "B4_L4096": (4, 4096)}


def cuda_tools() -> tuple[str, str] | None:
    """Paths of cuobjdump shipped in the Triton wheel (or on PATH), or None when the CUDA backend tools are absent."""
    try:
        import triton
    except ImportError:
        return None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = bin_dir / "cuobjdump"
    if cuobjdump.is_file() and os.access(cuobjdump, os.X_OK):
        return str(cuobjdump), str(bin_dir / "ptxas")
    found = shutil.which("cuobjdump")
    return (found, shutil.which("ptxas") or "") if found else None


class _StandInDriver:
    """The part of a Triton driver the JIT launcher asks before compiling: device, stream and target."""

    def __init__(self, cc: int, device: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)
        self.device = device

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def get_device_interface(self):
        import torch

        return torch.cuda


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JIT function and what the launcher would compile it with."""

    kernel: str
    fn: object
    signature: dict
    constants: dict
    attrs: dict
    num_warps: int
    num_stages: int


@contextlib.contextmanager
def record_launches(cc: int):
    """Within the block, Triton launches compile nothing and run nothing; they are appended to the yielded list.

    The stand-in driver's device id is the compute capability, so the JIT's per-device caches (which remember the
    target) never mix sm_80 and sm_90.
    """
    from triton import knobs
    from triton.runtime.driver import driver

    launches: list[Launch] = []

    def hook(*, fn, compile, **_):
        jit_fn = getattr(fn, "jit_function", fn)
        launches.append(
            Launch(
                kernel=jit_fn.fn.__name__,
                fn=jit_fn,
                signature=dict(compile["signature"]),
                constants=dict(compile["constants"]),
                attrs=dict(compile["configs"][0]),
                num_warps=compile["num_warps"],
                num_stages=compile["num_stages"],
            )
        )
        return True  # "already handled": the launcher returns without compiling or launching

    old_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_StandInDriver(cc, device=cc))
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = None  # back to the lazily created real driver (reset_active would create it now)


def _model_inputs(batch: int, seqlen: int, dtype, has_z=True):
    """Meta tensors laid out as zigma/mamba.py passes them to the op: (B, L, D) rows, B/C slices of x_proj's output."""
    import torch

    dim, dstate, rank = MODEL["dim"], MODEL["dstate"], MODEL["dt_rank"]
    meta = dict(device="meta", dtype=dtype)
    u = torch.empty(batch, seqlen, dim, **meta)
    delta = torch.empty(batch, seqlen, dim, **meta)
    z = torch.empty(batch, seqlen, dim, **meta) if has_z else None
    x_dbl = torch.empty(batch, seqlen, rank + 2 * dstate, **meta)
    b, c = x_dbl[..., rank : rank + dstate], x_dbl[..., rank + dstate :]
    f32 = dict(device="meta", dtype=torch.float32)
    A = torch.empty(dim, dstate, **f32)
    D = torch.empty(dim, **f32)
    bias = torch.empty(dim, **f32)
    return u, delta, A, b, c, D, z, bias


def record_model_launches(cc: int, sm_count: int, dtype, config, shapes=SHAPES) -> list[tuple[str, Launch]]:
    """(shape name, launch) for the forward (with states, as in training) and backward at each model shape."""
    import torch

    from zigma.ops import triton_scan

    rows = []
    for shape_name, (batch, seqlen) in shapes.items():
        u, delta, A, B, C, D, z, bias = _model_inputs(batch, seqlen, dtype)
        with record_launches(cc) as launches:
            _, _, states = triton_scan.launch_forward(
                u, delta, A, B, C, D, z, bias, True, config, store_states=True, sm_count=sm_count
            )
            triton_scan.launch_backward(torch.empty_like(u), u, delta, A, B, C, D, z, bias, states, True, config)
        rows += [(shape_name, launch) for launch in launches]
    return rows


def compile_launch(launch: Launch, cc: int):
    """triton.compile of a recorded launch for compute capability ``cc``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constants, attrs=launch.attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers, stack and static shared bytes per thread from ``cuobjdump -res-usage``; spill stores from SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    match = _RES.search(res)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {res!r}")
    regs, stack, shared, local = map(int, match.groups())
    spill_stores = len(re.findall(r"\bSTL(\.\w+)*\b", sass))
    spill_loads = len(re.findall(r"\bLDL(\.\w+)*\b", sass))
    return dict(regs=regs, stack=stack, static_shared=shared, local=local, spill_st=spill_stores, spill_ld=spill_loads)


def programs_per_sm(regs: int, warps: int, shared: int, cc: int) -> int:
    """Resident programs per SM allowed by registers (allocated per warp in units of 256), warps and shared memory."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_shared = SHARED_PER_SM[cc] // shared if shared else 32
    return max(0, min(by_regs, by_warps, by_shared, 32))


def report(dtypes, targets, config, cuobjdump: str, shapes=SHAPES, seen=None, only=None) -> list[dict]:
    """Compile every distinct kernel specialisation the model shapes launch; one row per (target, dtype, kernel).

    ``seen`` (a set of launch keys) skips launches an earlier call already compiled; ``only`` names the one kernel
    to compile.
    """
    rows, seen = [], set() if seen is None else seen
    for target_name in targets:
        cc, sm_count = TARGETS[target_name]
        for dtype in dtypes:
            for shape_name, launch in record_model_launches(cc, sm_count, dtype, config, shapes):
                key = (target_name, str(dtype), launch.kernel, repr(sorted(launch.signature.items())),
                       repr(sorted(launch.constants.items(), key=repr)), repr(sorted(launch.attrs.items(), key=repr)),
                       launch.num_warps)  # fmt: skip
                if key in seen or (only is not None and launch.kernel != only):
                    continue
                seen.add(key)
                kernel = compile_launch(launch, cc)
                usage = resource_usage(kernel.asm["cubin"], cuobjdump)
                usage["barriers"] = len(re.findall(r"\b(?:bar|barrier)\.sync", kernel.asm["ptx"]))
                shared = int(getattr(kernel.metadata, "shared", 0)) + usage["static_shared"]
                tiles = {
                    name: launch.constants.get(_const_key(launch, name))
                    for name in ("T", "BLOCK_D", "BLOCK_N", "REVERSE", "STORE_STATES", "DETERMINISTIC")
                }
                rows.append(
                    dict(
                        target=target_name,
                        dtype=str(dtype).replace("torch.", ""),
                        shape=shape_name,
                        kernel=launch.kernel,
                        tiles=",".join(f"{k}={v}" for k, v in tiles.items() if v is not None),
                        warps=launch.num_warps,
                        shared=shared,
                        programs_per_sm=programs_per_sm(usage["regs"], launch.num_warps, shared, cc),
                        **usage,
                    )
                )
    return rows


def sweep_backward(targets, dtype, cuobjdump: str, chunks=(32, 64), blocks=(8, 16, 32), warps=(4, 8)) -> list[dict]:
    """``_bwd_kernel`` at B=32, L=1024 for every (chunk_size, bwd_block_d, bwd_warps): the backward tiling sweep."""
    from zigma.ops.triton_scan import TritonScanConfig

    rows = []
    for chunk in chunks:
        for block in blocks:
            for warp in warps:
                config = TritonScanConfig(chunk_size=chunk, bwd_block_d=block, bwd_warps=warp)
                shapes = {"B32_L1024": SHAPES["B32_L1024"]}
                rows += report([dtype], targets, config, cuobjdump, shapes=shapes, only="_bwd_kernel")
    return rows


def _const_key(launch: Launch, name: str):
    """Key of a constexpr in ``launch.constants``: the name (Triton <= 3.2) or the (index,) path (later)."""
    if name in launch.constants:
        return name
    names = list(launch.signature)
    return (names.index(name),) if name in names else None


def format_table(rows: list[dict]) -> str:
    head = (
        "| target | dtype | shape | kernel | tiles | warps | regs | spill st/ld | stack | shared B | bar.sync "
        "| progs/SM |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['dtype']} | {r['shape']} | {r['kernel']} | {r['tiles']} | {r['warps']} | "
            f"{r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['shared']} | {r.get('barriers', '')} | "
            f"{r['programs_per_sm']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"]
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="also compile a sweep of backward tilings (slow)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_compile_report: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    tools = cuda_tools()
    if tools is None:
        print("triton_compile_report: SKIP, the Triton wheel has no CUDA backend tools (cuobjdump)")
        return 0
    import torch

    from zigma.ops.triton_scan import TritonScanConfig

    dtypes = [getattr(torch, d) for d in args.dtypes]
    seen = set()
    rows = report(dtypes, args.targets, TritonScanConfig(), tools[0], seen=seen)
    # the deterministic backward (partial sums instead of atomics), in the first dtype
    rows += report(dtypes[:1], args.targets, TritonScanConfig(deterministic=True), tools[0], seen=seen)
    print(format_table(rows))
    if args.sweep:
        print("\nBackward tiling sweep (_bwd_kernel, B=32, L=1024):")
        sweep = sweep_backward(args.targets, dtypes[0], tools[0])
        print(format_table(sweep))
        rows += sweep
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
