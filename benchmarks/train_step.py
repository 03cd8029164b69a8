"""ZigMa training-step and sampling benchmark: step time, images/s, peak memory and MFU, with the issue's targets.

Training rows (one process, same weights and inputs; each row builds its own model and AdamW): a full step =
``zero_grad``, forward + flow-matching loss under bf16 autocast, backward, ``AdamW.step`` of
``zigma.create_model(preset)`` (default ``zigzag8_b1_pe2``: ZigMa-B, 256² images as 4×32×32 latents, L = 1024),
at batch 32. Rows:

* ``zigzag8``: the baseline (scan backend ``auto``, eager, no checkpointing); every ``x baseline`` refers to it;
* ``raster (v1)``: identity scan order, for the permutation overhead = (t_zigzag - t_raster) / t_zigzag;
* ``zigzag8 + checkpointing``: ``use_checkpoint=True`` (memory ratio and slowdown vs the baseline);
* ``backend=<name>``: every other scan backend available on the device (triton, cuda, torch: the slowest last);
* ``compiled``: with ``--compile``, the model compiled in place (``nn.Module.compile``, as ``PerformanceSwitches``).

Sampling rows: images/s of ``Sampler.sample_ode(method="euler", num_steps=51)`` (50 Euler steps, 50 NFE) at batch 64,
forward only (no EMA), bf16 autocast; eager and, with ``--compile``, compiled.

MFU = ``zigma.flops.training_flops_per_sample`` (analytic, 3x the forward; recompute not counted) x batch / median
step time / peak, with the dense bf16 peak of the card read from ``torch.cuda.get_device_name()`` (H100 SXM and H200:
989 TFLOP/s, H100 PCIe 756, A100 312; ``--peak-tflops`` overrides). Every row whose function equals the baseline's
(backends, checkpointing, compile) is checked first: max |output - baseline output| on one fixed batch, before
timing. Times are medians of CUDA-event timed steps after warm-up (spread min..max); peak memory is
``max_memory_allocated`` over the timed steps (weights, gradients and AdamW state included); "activations" is that
peak minus what was allocated before the timed steps. A row that fails (OOM or an error) is reported as such and the
others still run; ``--time-budget`` skips the rows left once that many seconds have passed.

    python3 benchmarks/train_step.py                         # all eager rows + sampling (H100: a few minutes)
    python3 benchmarks/train_step.py --compile --quick       # + compiled rows; fewer repeats (benchmarks/gpu_all.sh)
    python3 benchmarks/train_step.py --device cpu --small    # smoke test on CPU (tiny model, < 1 min)

The scan backend column is the one that ran for the scan's input dtype (the autocast dtype): where the Triton kernel
fails its runtime self-check (``zigma/ops/guard.py``), ``auto`` shows ``torch``. The targets end the output as
``KEY:`` lines (benchmarks/gpu_all.sh collects them).

Targets (issue 8): MFU >= 35%; permutation overhead <= 3% of the step; gradient checkpointing <= 0.5x peak memory
for <= 20% slower steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from zigma import PRESETS, create_model  # noqa: E402
from zigma.flops import training_flops_per_sample  # noqa: E402
from zigma.ops import available_backends, resolve_backend  # noqa: E402
from zigma.sampling import Sampler  # noqa: E402
from zigma.transport import create_transport  # noqa: E402

# (substring of the lower-cased device name, dense bf16 TFLOP/s, label); first match wins, so PCIe precedes SXM
PEAK_BF16_TFLOPS = (
    ("h200", 989.0, "H200 bf16 dense"),
    ("h100 pcie", 756.0, "H100 PCIe bf16 dense"),
    ("h100 nvl", None, "H100 NVL: not in the table"),
    ("h100", 989.0, "H100 SXM bf16 dense"),
    ("a100", 312.0, "A100 bf16 dense"),
)
TARGETS = {"mfu": 0.35, "permutation": 0.03, "ckpt_memory": 0.5, "ckpt_slowdown": 0.20}
SMALL_MODEL = {"embed_dim": 64, "depth": 2, "img_dim": 8}  # --small: L = 64 tokens, 4 channels


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    scan_type: str | None = None  # None = the preset's
    backend: str = "auto"
    checkpoint: bool = False
    compile: bool = False
    same_function: bool = True  # computes the baseline's function (checked against its output)
    slow: bool = False  # fewer repeats (the torch backend on a GPU: Python loops over L)


@dataclasses.dataclass
class Row:
    name: str
    backend: str = ""
    status: str = "ok"
    times_ms: list[float] = dataclasses.field(default_factory=list)
    peak_gb: float = float("nan")
    activation_gb: float = float("nan")
    diff: float | None = None
    warmup_s: float = float("nan")
    batch: int = 0
    flops: float = 0.0  # per timed unit (a training step, or one whole sampling run)
    nfe: int = 0
    notes: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")


# ------------------------------------------------------------------------------------------------ environment
def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True).returncode
        return (sha.stdout.strip() or "unknown") + (" (+ uncommitted changes)" if dirty == 1 else "")
    except OSError:
        return "unknown"


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s or None, which one and why)."""
    if override is not None:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if device != "cuda":
        return None, "none on CPU (MFU not computed)"
    name = torch.cuda.get_device_name().lower()
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key in name:
            if tflops is None:
                break
            return tflops, f"{tflops:g} TFLOP/s ({label}, from device name {name!r})"
    return None, f"unknown for {name!r}: MFU not computed (pass --peak-tflops)"


def header(args, device: str, peak_label: str) -> list[str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return [
        f"# card {card} | peak {peak_label}",
        f"# date {datetime.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} | triton "
        f"{triton_version} | CUDA {torch.version.cuda} | commit {_git_commit()}",
        f"# preset {args.preset}{' (--small: ' + str(SMALL_MODEL) + ')' if args.small else ''} | autocast "
        f"{args.dtype} | batch {args.batch} | median of {args.repeats} timed steps after {args.warmup} warm-up",
    ]


# ---------------------------------------------------------------------------------------------------- helpers
class Clock:
    """CUDA events on a GPU, perf_counter on CPU; ``sync`` waits for the device."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)


def autocast(args, device: str):
    if args.dtype == "fp32":
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])


def build_model(args, device: str, **overrides):
    """The preset with fixed weights; adaLN gates redrawn (the DiT init zeroes them, which would hide the scan from
    both the output check and the backward)."""
    torch.manual_seed(0)
    model = create_model(args.preset, **(SMALL_MODEL if args.small else {}), **overrides).to(device)
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.01)
    return model


def _graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (a counter that ``torch._dynamo.reset`` keeps)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def error_status(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "OOM"
    traceback.print_exc()
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


# -------------------------------------------------------------------------------------------------- training
def train_row(cfg: TrainConfig, args, device: str, clock: Clock, data, baseline_out) -> tuple[Row, torch.Tensor]:
    """Measure one training configuration; returns the row and its check output (B, C, H, W) on the fixed batch."""
    x1, x0, t = data
    overrides = {"scan_backend": cfg.backend, "use_checkpoint": cfg.checkpoint}
    if cfg.scan_type is not None:
        overrides["scan_type"] = cfg.scan_type
    model = build_model(args, device, **overrides)
    row = Row(cfg.name, backend=resolve_backend(cfg.backend, device, scan_dtype(args)), batch=x1.shape[0])
    row.flops = training_flops_per_sample(model) * x1.shape[0]
    if cfg.compile:
        graphs_before = _graphs_compiled()
        model.compile(mode=args.compile_mode, backend=args.compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    transport = create_transport()

    # the output check; a compiled model runs it with gradients on, so that it compiles the training graph only once
    with torch.set_grad_enabled(cfg.compile), autocast(args, device):
        out = model(x0, t).detach().float()
    if cfg.compile:  # 1 graph = the whole forward; more = graph breaks (or recompiles)
        row.notes = f"{_graphs_compiled() - graphs_before} Dynamo graph(s)"
    if cfg.same_function and baseline_out is not None:
        row.diff = (out - baseline_out).abs().max().item()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(args, device):
            loss = transport.training_losses(model, x1, x0=x0, t=t)["loss"].mean()
        loss.backward()
        optimizer.step()

    warmup = 1 if cfg.slow else args.warmup
    repeats = min(args.repeats, 2) if cfg.slow else args.repeats
    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    clock.sync()
    row.warmup_s = time.perf_counter() - begin
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    row.times_ms = [clock.time_ms(step) for _ in range(repeats)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        row.peak_gb, row.activation_gb = peak / 1e9, (peak - base) / 1e9
    return row, out


# -------------------------------------------------------------------------------------------------- sampling
def sample_row(name: str, compiled: bool, args, device: str, clock: Clock) -> Row:
    """Images/s of 50-step Euler sampling (forward only, no gradients, no EMA)."""
    model = build_model(args, device).eval()
    graphs_before = _graphs_compiled()
    if compiled:
        model.compile(mode=args.compile_mode, backend=args.compile_backend)
    shape = (args.sample_batch, model.in_channels, model.img_dim, model.img_dim)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    sampler = Sampler(create_transport())
    row = Row(name, backend=resolve_backend("auto", device, scan_dtype(args)), batch=args.sample_batch)
    row.flops = training_flops_per_sample(model) / 3 * args.sample_batch * args.sample_steps

    def run(num_steps):
        with torch.no_grad(), autocast(args, device):
            return sampler.sample_ode(method="euler", num_steps=num_steps + 1)(x0, model)

    begin = time.perf_counter()
    run(2)  # warm-up (and compilation): two Euler steps
    clock.sync()
    if compiled:
        row.notes = f"{_graphs_compiled() - graphs_before} Dynamo graph(s)"
    row.warmup_s = time.perf_counter() - begin
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    results = []
    row.times_ms = [clock.time_ms(lambda: results.append(run(args.sample_steps))) for _ in range(args.sample_repeats)]
    row.nfe = results[-1].nfe
    if not torch.isfinite(results[-1].x).all():
        row.status = "ok (non-finite samples)"
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        row.peak_gb, row.activation_gb = peak / 1e9, (peak - base) / 1e9
    return row


# ---------------------------------------------------------------------------------------------------- report
def _fmt(value: float, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or value != value else format(value, spec)


def _spread(row: Row) -> str:
    return f"{row.median_ms:.1f} ({min(row.times_ms):.1f}..{max(row.times_ms):.1f})"


def report(args, device: str, peak: float | None, peak_label: str, rows: list[Row], samples: list[Row]) -> str:
    lines = header(args, device, peak_label)
    base = next((r for r in rows if r.name == "zigzag8" and r.times_ms), None)
    lines += [
        "",
        "## Training step (forward + backward + AdamW)",
        "",
        "| config | scan backend | median ms (min..max) | x baseline | img/s | TFLOP/s | MFU | peak GB "
        "| activations GB | max abs diff vs baseline | warm-up s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.times_ms:
            lines.append(f"| {r.name} | {r.backend} | {r.status} | | | | | | | | | |")
            continue
        seconds = r.median_ms / 1e3
        tflops = r.flops / seconds / 1e12
        ratio = f"{r.median_ms / base.median_ms:.2f}x" if base else "n/a"
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        diff = "baseline" if r is base else ("-" if r.diff is None else f"{r.diff:.2e}")
        lines.append(
            f"| {r.name} | {r.backend} | {_spread(r)} | {ratio} | {r.batch / seconds:.1f} | {tflops:.3g} | {mfu} | "
            f"{_fmt(r.peak_gb, '.2f')} | {_fmt(r.activation_gb, '.2f')} | {diff} | {r.warmup_s:.1f} | {r.notes} |"
        )
    lines += [
        "",
        f"## Sampling: Euler, {args.sample_steps} steps, batch {args.sample_batch}, no gradients",
        "",
        "| model | scan backend | median s (min..max) | img/s | NFE | ms per NFE | TFLOP/s | peak GB | warm-up s "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in samples:
        if not r.times_ms:
            lines.append(f"| {r.name} | {r.backend} | {r.status} | | | | | | | |")
            continue
        seconds = r.median_ms / 1e3
        lines.append(
            f"| {r.name} | {r.backend} | {seconds:.2f} ({min(r.times_ms) / 1e3:.2f}..{max(r.times_ms) / 1e3:.2f}) | "
            f"{r.batch / seconds:.1f} | {r.nfe} | {r.median_ms / max(r.nfe, 1):.1f} | {r.flops / seconds / 1e12:.3g} | "
            f"{_fmt(r.peak_gb, '.2f')} | {r.warmup_s:.1f} | {r.notes} |"
        )
    lines += ["", "## Targets (issue 8)", "", "| metric | measured | target | met |", "|---|---|---|---|"]
    lines += targets(rows, base, peak, samples)
    return "\n".join(lines) + "\n"


def targets(rows: list[Row], base: Row | None, peak: float | None, samples: list[Row]) -> list[str]:
    def met(ok: bool | None) -> str:
        return "n/a" if ok is None else ("yes" if ok else "NO")

    found = {r.name: r for r in rows if r.times_ms}
    out = []
    if base and peak:
        mfu = base.flops / (base.median_ms / 1e3) / 1e12 / peak
        out.append(f"| MFU, baseline (zigzag8, eager) | {100 * mfu:.1f}% | >= 35% | {met(mfu >= TARGETS['mfu'])} |")
    else:
        out.append("| MFU, baseline (zigzag8, eager) | n/a | >= 35% | n/a |")
    if "compiled" in found and peak:
        c = found["compiled"]
        mfu = c.flops / (c.median_ms / 1e3) / 1e12 / peak
        out.append(f"| MFU, compiled | {100 * mfu:.1f}% | >= 35% | {met(mfu >= TARGETS['mfu'])} |")
    raster = found.get("raster (v1)")
    if base and raster:
        overhead = (base.median_ms - raster.median_ms) / base.median_ms
        ok = overhead <= TARGETS["permutation"]
        out.append(
            f"| permutation overhead (zigzag8 vs raster) | {100 * overhead:.1f}% of the step | <= 3% | {met(ok)} |"
        )
    else:
        out.append("| permutation overhead (zigzag8 vs raster) | n/a | <= 3% | n/a |")
    ckpt = found.get("zigzag8 + checkpointing")
    if base and ckpt:
        memory = ckpt.peak_gb / base.peak_gb if base.peak_gb == base.peak_gb else float("nan")
        act = ckpt.activation_gb / base.activation_gb if base.activation_gb == base.activation_gb else float("nan")
        slowdown = ckpt.median_ms / base.median_ms - 1
        mem_ok = None if memory != memory else memory <= TARGETS["ckpt_memory"]
        out.append(
            f"| checkpointing: peak memory vs baseline (activations only) | {_fmt(memory, '.2f')}x "
            f"({_fmt(act, '.2f')}x) | <= 0.5x | {met(mem_ok)} |".replace("n/ax", "n/a")
        )
        ok = slowdown <= TARGETS["ckpt_slowdown"]
        out.append(f"| checkpointing: slowdown | {100 * slowdown:+.1f}% | <= +20% | {met(ok)} |")
    else:
        out.append("| checkpointing: peak memory / slowdown | n/a | <= 0.5x / <= +20% | n/a |")
    if base and "compiled" in found:
        out.append(f"| compiled vs eager step | {base.median_ms / found['compiled'].median_ms:.2f}x faster | - | - |")
    for s in samples:
        if s.times_ms:
            out.append(f"| sampling img/s ({s.name}) | {s.batch / (s.median_ms / 1e3):.1f} | - | - |")
    return out


def scan_dtype(args) -> torch.dtype:
    """The selective scan's input dtype in these runs: the autocast dtype (the conv before it runs under autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]


# ------------------------------------------------------------------------------------------------------ main
def train_configs(args, device: str) -> list[TrainConfig]:
    auto = resolve_backend("auto", device, scan_dtype(args))
    configs = [
        TrainConfig("zigzag8"),
        TrainConfig("raster (v1)", scan_type="v1", same_function=False),
        TrainConfig("zigzag8 + checkpointing", checkpoint=True),
    ]
    others = [b for b in ("triton", "cuda", "torch") if b in available_backends(device) and b != auto]
    configs += [TrainConfig(f"backend={b}", backend=b, slow=b == "torch" and device == "cuda") for b in others]
    if args.compile:
        configs.append(TrainConfig("compiled", compile=True))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help=f"tiny model {SMALL_MODEL}, small batches (smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (2 warm-up, 5 timed steps, 1 sampling run)")
    parser.add_argument("--preset", default="zigzag8_b1_pe2")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 32; 4 with --small)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add the compiled training and sampling rows")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--no-sample", action="store_true", help="skip the sampling rows")
    parser.add_argument("--sample-batch", type=int, default=None, help="default 64; 4 with --small")
    parser.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default 50; 5 with --small)")
    parser.add_argument("--sample-repeats", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense peak")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; skip later rows (0: none)")
    parser.add_argument("--report", type=Path, default=None, help="rewrite this markdown file after every row")
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    args = parser.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step: no CUDA device; run with --device cpu --small for a CPU smoke test")
    cuda = device == "cuda"
    args.batch = args.batch or (4 if args.small else 32)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 2 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.small else 5 if args.quick else 10)
    args.sample_batch = args.sample_batch or (4 if args.small else 64)
    args.sample_steps = args.sample_steps or (5 if args.small else 50)
    args.sample_repeats = args.sample_repeats or (1 if args.small or args.quick else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as FlowMatchingModule(allow_tf32=True) does
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_label = peak_tflops(device, args.peak_tflops)
    clock = Clock(device)
    start = time.perf_counter()
    print("\n".join(header(args, device, peak_label)), flush=True)

    spec = {**PRESETS[args.preset], **(SMALL_MODEL if args.small else {})} if args.preset in PRESETS else {}
    if "in_channels" not in spec or "img_dim" not in spec:  # a size factory: the model itself knows (or raises)
        probe = build_model(args, "cpu")
        spec = {"in_channels": probe.in_channels, "img_dim": probe.img_dim}
    shape = (args.batch, spec["in_channels"], spec["img_dim"], spec["img_dim"])
    gen = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)  # data, noise (B, C, H, W)
    t = torch.rand(args.batch, generator=gen)  # (B,) in [0, 1]
    data = (x1.to(device), x0.to(device), t.to(device))

    rows: list[Row] = []
    samples: list[Row] = []
    baseline_out = None

    def over_budget() -> bool:
        return args.time_budget > 0 and time.perf_counter() - start > args.time_budget

    def save() -> None:
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(report(args, device, peak, peak_label, rows, samples))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)

            def plain(r: Row) -> dict:  # NaN (not measured, e.g. memory on CPU) -> null
                return {k: None if v != v else v for k, v in dataclasses.asdict(r).items()}

            payload = {"peak_tflops": peak, "rows": [plain(r) for r in rows], "samples": [plain(r) for r in samples]}
            args.json.write_text(json.dumps(payload, indent=1))

    plan: list[tuple[str, object]] = [("train", c) for c in train_configs(args, device) if not c.compile]
    if not args.no_sample:
        plan.append(("sample", ("eager", False)))
    plan += [("train", c) for c in train_configs(args, device) if c.compile]
    if args.compile and not args.no_sample:
        plan.append(("sample", ("compiled", True)))
    # the torch backend on a GPU is slow (Python loops over L): measure it after everything else
    plan.sort(key=lambda item: item[0] == "train" and item[1].slow)

    # SIGTERM (gpu_all.sh's per-step timeout) ends the rows early but still prints the report and the KEY lines
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        for kind, item in plan:
            name = item.name if kind == "train" else item[0]
            if over_budget():
                skipped = Row(name, status=f"skipped (time budget {args.time_budget:g} s)")
                (rows if kind == "train" else samples).append(skipped)
                continue
            try:
                if kind == "train":
                    row, out = train_row(item, args, device, clock, data, baseline_out)
                    if item.name == "zigzag8":
                        baseline_out = out
                    rows.append(row)
                else:
                    row = sample_row(item[0], item[1], args, device, clock)
                    samples.append(row)
            except Exception as err:  # report the failure (OOM, a backend error) and go on with the other rows
                row = Row(name, status=error_status(err))
                (rows if kind == "train" else samples).append(row)
            finally:
                if (kind == "train" and item.compile) or (kind == "sample" and item[1]):
                    torch._dynamo.reset()
                release(device)
            timing = f"{row.median_ms:.1f} ms (warm-up {row.warmup_s:.1f} s)" if row.times_ms else row.status
            print(f"[{time.perf_counter() - start:6.1f} s] {kind} {name}: {timing}", flush=True)
            save()
    finally:
        print()
        print(report(args, device, peak, peak_label, rows, samples), end="")
        base = next((r for r in rows if r.name == "zigzag8" and r.times_ms), None)
        for line in targets(rows, base, peak, samples):
            metric, measured, target, met = (cell.strip() for cell in line.strip("|").split("|"))
            print(f"KEY: {metric} {measured}" + (f" (target {target}, met: {met})" if target != "-" else ""))


if __name__ == "__main__":
    main()
