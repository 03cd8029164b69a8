"""Where the CPU time of a quickstart training step goes, and how fast steps are against a baseline tree.

The run is the real one: ``configs/quickstart.yaml`` (its model, batch 32, its callbacks, progress bar and logging)
built by ``ZigMaCLI`` and fitted in-process by Lightning on the CPU. Steps before ``--warmup`` are not measured; the
measured window stays below the config's first validation/checkpoint/sample-grid step (175), so it is steady-state
training (the periodic evaluation is not part of a step).

Profile (default): ``torch.profiler`` over ``--steps`` steps; the time of every profiled op is given to one category:

* ``scan``: the selective-scan custom ops (forward and backward) and the softplus of its Δ;
* ``convolution``: the causal depthwise conv (``Conv1d``, or ``zigma.mamba.causal_depthwise_conv``) and the
  patch-embedding conv2d (forward and backward);
* ``permutations``: what ``LayerScan`` does outside the mixer (the zigzag gathers and, in backward, their scatters);
* ``adaLN, norms, residual``: everything ``Block`` does itself (add+RMSNorm, adaLN MLP, modulate, gate) and
  the norms elsewhere;
* ``mixer projections/gating``: the rest of ``MambaMixer`` (in/x/dt/out projections, SiLU, splits);
* ``embeddings, loss, other model ops``: the rest of the forward/backward (patch/time embedders, loss);
* ``optimizer``: ``AdamW.step`` and ``zero_grad``; ``gradient norm + clipping``; ``EMA``; ``data`` (fetching a batch);
* ``Lightning overhead``: the window's wall time not inside any of the above (loops, hooks, logging, callbacks,
  progress bar, the closure machinery).

A backward op is given the category of the forward op that created its autograd node (matched by the profiler's
sequence number); Python time inside an instrumented scope goes to that scope's category. Instrumentation is done by
this script (``record_function`` wrappers on instances and a few Lightning methods), not by the package.

Compare (``--baseline DIR``): the same fit without the profiler, alternately in the baseline tree ``DIR`` (e.g. an
export of main: ``git archive main | tar -x -C /tmp/main``) and in this tree, ``--rounds`` times each, each run a fresh
subprocess; reports median steps/s (wall), process CPU seconds per step (``time.process_time``, all threads: less
sensitive to other load on a shared machine than wall time) and the worker's peak RSS (``ru_maxrss``), and the ratios.
``--baseline`` may be repeated (e.g. two commits of main): all trees run interleaved, round by round.

    python benchmarks/profile_cpu.py                                   # profile table (~1 min on 2 cores)
    python benchmarks/profile_cpu.py --baseline /tmp/main --rounds 3   # steps/s against main
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THIS_ROOT = Path(__file__).resolve().parents[1]

CATEGORIES = (
    "scan",
    "convolution",
    "permutations",
    "adaLN, norms, residual",
    "mixer projections/gating",
    "embeddings, loss, other model ops",
    "optimizer",
    "gradient norm + clipping",
    "EMA",
    "data",
    "Lightning overhead",
)
_SCOPE = "cat::"  # record_function names that set a category for everything below them


def _use_code_root(root: Path) -> None:
    """Import ``zigma``, ``datamodules``, ``callbacks`` and ``zigma_lightning`` from ``root`` (this or a baseline)."""
    os.chdir(root)
    sys.path.insert(0, str(root))


def build_cli(batch: int, extra: list[str], log_dir: str):
    """``ZigMaCLI`` (run=False) for the quickstart config with ``max_steps`` set by the caller's ``extra``."""
    from datamodules import ZigMaDataModule
    from zigma.flow_module import FlowMatchingModule
    from zigma_lightning.cli import DEFAULT_LOGGER, ZigMaCLI

    args = ["--config", "configs/quickstart.yaml", "--data.init_args.batch_size", str(batch),
            "--trainer.logger.init_args.save_dir", log_dir, *extra]  # fmt: skip
    return ZigMaCLI(FlowMatchingModule, ZigMaDataModule, subclass_mode_data=True, seed_everything_default=0,
                    save_config_kwargs={"overwrite": True}, run=False, args=args,
                    trainer_defaults={"logger": DEFAULT_LOGGER, "log_every_n_steps": 10})  # fmt: skip


def _scoped(name: str, fn):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def instrument(module) -> None:
    """Wrap the pieces of the step whose time is counted in a category (instances and Lightning internals)."""
    from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
    from lightning.pytorch.loops.optimization.automatic import Closure
    from torch import nn

    from zigma.mamba import MambaMixer
    from zigma.model import Block
    from zigma.scan import LayerScan

    for m in module.model.modules():
        if isinstance(m, Block):
            m.forward = _scoped(_SCOPE + "adaLN, norms, residual", m.forward)
        elif isinstance(m, LayerScan):
            m.forward = _scoped(_SCOPE + "permutations", m.forward)
        elif isinstance(m, MambaMixer):
            m.forward = _scoped(_SCOPE + "mixer projections/gating", m.forward)
        elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":
            m.forward = _scoped(_SCOPE + "adaLN, norms, residual", m.forward)
    module.training_step = _scoped(_SCOPE + "embeddings, loss, other model ops", module.training_step)
    module.backward = _scoped(_SCOPE + "embeddings, loss, other model ops", module.backward)
    module.on_before_optimizer_step = _scoped(_SCOPE + "gradient norm + clipping", module.on_before_optimizer_step)
    module.clip_gradients = _scoped(_SCOPE + "gradient norm + clipping", module.clip_gradients)
    module.ema.update = _scoped(_SCOPE + "EMA", module.ema.update)
    _PrefetchDataFetcher.__next__ = _scoped(_SCOPE + "data", _PrefetchDataFetcher.__next__)
    import zigma.mamba

    if hasattr(zigma.mamba, "causal_depthwise_conv"):  # the CPU conv of issue 17 (the baseline calls Conv1d)
        zigma.mamba.causal_depthwise_conv = _scoped(_SCOPE + "convolution", zigma.mamba.causal_depthwise_conv)
    Closure.__call__ = _scoped(_SCOPE + "Lightning overhead", Closure.__call__)


def _own_category(event, forward_category: dict[int, str]) -> str | None:
    """The category an event sets by itself (None: it inherits its parent's)."""
    name = event.name
    if name.startswith(_SCOPE):
        return name[len(_SCOPE) :]
    if "selective_scan" in name or "softplus" in name:  # softplus: the scan's Δ' (in the mixer since issue 17)
        return "scan"
    if "convolution" in name.lower() or name in ("aten::conv1d", "aten::conv2d"):
        return "convolution"
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return "optimizer"
    if name.startswith("autograd::engine::evaluate_function:") and event.sequence_nr >= 0:
        return forward_category.get(event.sequence_nr)
    return None


def categorize(events) -> dict[str, float]:
    """Self CPU time (µs) of the main thread's events per category; events outside every category -> Lightning."""
    main_thread = collections.Counter(e.thread for e in events if e.cpu_parent is None).most_common(1)[0][0]
    events = [e for e in events if e.thread == main_thread]
    category: dict[int, str] = {}
    forward_category: dict[int, str] = {}

    def resolve(e, seq_map) -> str:
        key = id(e)
        if key not in category:
            own = _own_category(e, seq_map)
            parent = resolve(e.cpu_parent, seq_map) if e.cpu_parent is not None else "Lightning overhead"
            category[key] = own or parent
        return category[key]

    ordered = sorted(events, key=lambda e: e.time_range.start)
    for e in ordered:  # forward ops first, so backward nodes can look up their creators
        if not e.name.startswith("autograd::engine") and e.sequence_nr >= 0:
            forward_category.setdefault(e.sequence_nr, resolve(e, forward_category))
    category.clear()
    totals = collections.defaultdict(float)
    for e in ordered:
        totals[resolve(e, forward_category)] += e.self_cpu_time_total
    return totals


class StepWindow:
    """A Lightning callback timing steps [warmup, warmup + steps): wall and process CPU, optionally profiled."""

    def __init__(self, warmup: int, steps: int, profile: bool):
        import lightning as L

        outer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == warmup:
                    outer.start()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == warmup + steps:
                    outer.stop()

        self.callback = _Callback()
        self.profile = profile
        self.steps = steps
        self.profiler = None
        self.wall = self.cpu = float("nan")

    def start(self) -> None:
        if self.profile:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.profiler.__enter__()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def fit_window(args, profile: bool) -> tuple[StepWindow, object]:
    """Fit warmup + steps steps of the quickstart config in-process, measuring the window."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args.batch, ["--trainer.max_steps", str(total), *args.extra], log_dir)
        window = StepWindow(args.warmup, args.steps, profile)
        cli.trainer.callbacks.append(window.callback)
        if profile:
            instrument(cli.model)
        cli.trainer.fit(cli.model, cli.datamodule)
    return window, cli.model


def profile_table(args) -> str:
    window, model = fit_window(args, profile=True)
    events = window.profiler.events()
    totals = categorize(events)
    window_us = window.wall * 1e6
    totals["Lightning overhead"] += max(0.0, window_us - sum(totals.values()))  # wall time no event covered
    n = window.steps
    params = sum(p.numel() for p in model.model.parameters())
    lines = [
        f"# benchmarks/profile_cpu.py: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
        f"{_git_commit()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{__import__('torch').__version__}, {__import__('torch').get_num_threads()} threads",
        f"# configs/quickstart.yaml model ({params / 1e6:.2f} M parameters), batch {args.batch}, {n} steps after "
        f"{args.warmup} warm-up, profiled: {n / window.wall:.2f} steps/s, {window.cpu / n * 1e3:.0f} ms CPU/step",
        "",
        "| category | ms / step | share |",
        "|---|---:|---:|",
    ]
    for name in CATEGORIES:
        ms = totals.get(name, 0.0) / 1e3 / n
        lines.append(f"| {name} | {ms:.1f} | {totals.get(name, 0.0) / window_us:.1%} |")
    lines.append(f"| **step (wall)** | **{window.wall / n * 1e3:.1f}** | 100% |")
    if args.top:
        lines += ["", f"Top {args.top} ops by self CPU time (ms / step):", ""]
        averages = window.profiler.key_averages()
        for item in sorted(averages, key=lambda a: -a.self_cpu_time_total)[: args.top]:
            lines.append(f"    {item.self_cpu_time_total / 1e3 / n:8.2f}  {item.count // n:5d}x  {item.key}")
    return "\n".join(lines)


def _git_commit(root: Path = THIS_ROOT) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def worker(args) -> None:
    window, _ = fit_window(args, profile=False)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = {"wall": window.wall, "cpu": window.cpu, "steps": window.steps, "peak_rss_mib": peak_rss_mib}
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args, root: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--code-root", str(root), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--threads", str(args.threads)]  # fmt: skip
    cmd += [f"--extra={e}" for e in args.extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker in {root} failed:\n{done.stderr[-3000:]}")


def compare(args) -> str:
    baselines = [Path(b).resolve() for b in args.baseline]
    names = ["baseline"] if len(baselines) == 1 else [f"baseline {i + 1}" for i in range(len(baselines))]
    trees = {**dict(zip(names, baselines)), "this tree": Path(args.tree).resolve()}
    results = {name: [] for name in trees}
    for _ in range(args.rounds):  # interleaved, so slow phases of a shared machine hit both alike
        for name, root in trees.items():
            results[name].append(run_worker(args, root))
            run = results[name][-1]
            rate, cpu_ms = run["steps"] / run["wall"], run["cpu"] / run["steps"] * 1e3
            print(f"{name}: {rate:.2f} steps/s, {cpu_ms:.0f} ms CPU/step", file=sys.stderr, flush=True)
    lines = [
        f"# benchmarks/profile_cpu.py --baseline: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs; quickstart model, batch {args.batch}, {args.steps} steps after {args.warmup} "
        f"warm-up, {args.rounds} interleaved rounds (medians; fresh process each)",
        *(f"# {name}: {root}" for name, root in trees.items()),
        f"# this tree's commit: {_git_commit(trees['this tree'])}",
        "",
        "| tree | steps/s (wall) | ms CPU / step (process) | peak RSS MiB | runs steps/s | runs ms CPU / step |",
        "|---|---:|---:|---:|---|---|",
    ]
    medians = {}
    for name, runs in results.items():
        rate = statistics.median(r["steps"] / r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] / r["steps"] * 1e3 for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        medians[name] = (rate, cpu)
        each = ", ".join(f"{r['steps'] / r['wall']:.2f}" for r in runs)
        each_cpu = ", ".join(f"{r['cpu'] / r['steps'] * 1e3:.0f}" for r in runs)
        lines.append(f"| {name} | {rate:.2f} | {cpu:.0f} | {rss:.0f} | {each} | {each_cpu} |")
    t_rate, t_cpu = medians["this tree"]
    for name in names:
        b_rate, b_cpu = medians[name]
        label = "ratio" if len(names) == 1 else f"ratio to {name}"
        lines.append(f"| **{label}** | **{t_rate / b_rate:.2f}x** | **{b_cpu / t_cpu:.2f}x less** | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the window (default 10)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--top", type=int, default=15, help="also list the N ops with the most self time")
    parser.add_argument(
        "--baseline", action="append", help="a baseline tree (e.g. an export of main) to compare with; repeatable"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", default=str(THIS_ROOT), help="the tree compared with --baseline (default: this one)")
    parser.add_argument("--extra", action="append", default=[], help="one more CLI argument for the fit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", default=str(THIS_ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args()
    _use_code_root(Path(args.code_root))
    if args.worker:
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # the progress bar
            worker(args)
        return
    print(compare(args) if args.baseline else profile_table(args))


if __name__ == "__main__":
    main()
