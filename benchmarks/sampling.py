"""Sampling throughput and peak memory: ``zigma sample`` and today's ``predict`` against the ``predict`` of before
issue 15, in the same run.

Three ways to make N samples of one checkpoint, each in a fresh process (so its peak RSS is its own):

- ``sample``: ``zigma sample`` (``zigma_lightning.sample.main``): uint8 shards per batch, then grid + samples.npz on
  disk; no PNGs (its default).
- ``predict``: ``Trainer.predict`` with today's ``callbacks.SampleWriter`` (PNGs + shards per batch through
  ``zigma.sample_store.SampleStore``, grid of the first 64, ``save_npz``).
- ``predict-old`` (the baseline): the same ``Trainer.predict`` with the ``SampleWriter`` of commit
  ``--baseline-commit`` (read from git), which keeps every sample in float32, tiles all of them into one grid and
  writes samples.npz from memory.

Models (random weights; speed and memory do not depend on the values): the quickstart model
(``configs/quickstart.yaml``: 1×32×32 pixels, embed 128, depth 6), a latent model (4×8×8 latents, embed 64, depth 2)
decoded by a tiny random diffusers AutoencoderKL (2 blocks, loaded from a temp directory through
``zigma.vae.FrozenVAE``'s real loading code) to 3×16×16 pixels, each at ``--speed`` samples; and, for memory, the
quickstart model shrunk as the CLI tests shrink it (``tests/e2e/tiny.yaml``: embed 16, depth 2; the same 1×32×32
samples, so the same bytes per sample) at ``--small`` and ``--large`` samples, since 20k samples of the full
quickstart model take about an hour on 2 CPU cores. Euler with ``--steps`` grid points (default 2: one model call per
sample; memory does not depend on the steps). Reported per run: wall seconds, process CPU seconds (all threads; less
sensitive to other load on a shared machine), samples/s (wall), from loading the checkpoint to the written
samples.npz (the imports of each process are not timed), peak RSS (``ru_maxrss`` of that process). The peak
RSS growth from ``--small`` to ``--large`` must stay below 5% for ``sample`` and ``predict``.

    python benchmarks/sampling.py                       # 2-core CPU: ~15 minutes
    python benchmarks/sampling.py --speed 100 --small 200 --large 1000   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = ("predict-old", "predict", "sample")
LATENT_NET = {"in_channels": 4, "img_dim": 8, "patch_size": 2, "embed_dim": 64, "depth": 2, "scan_type": "zigzagN8"}
TINY_NET = {"embed_dim": 16, "depth": 2, "patch_size": 4}  # tests/e2e/tiny.yaml's model.net over the quickstart's


def write_tiny_vae(directory: Path) -> Path:
    """A random 2-block AutoencoderKL (downsample 2, 4 latent channels), as tests/conftest.py's tiny_vae_dir."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(directory)  # fmt: skip
    return directory


def write_checkpoint(path: Path, steps: int, vae: Path | None = None, tiny: bool = False) -> Path:
    """A Lightning-format checkpoint (state_dict, hyper_parameters, recorded config) of a random-weight module whose
    EMA counts one update: the quickstart model (``tiny``: shrunk), or the latent model decoded by ``vae``."""
    import yaml

    from zigma.flow_module import FlowMatchingModule

    torch.manual_seed(0)
    if vae is None:
        settings = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]
        if tiny:
            settings["net"] = {**settings["net"], **TINY_NET}
    else:
        settings = {"net": LATENT_NET, "vae": str(vae)}
    module = FlowMatchingModule(**{**settings, "sample_method": "euler", "sample_steps": steps})
    module.ema.update(module.model)
    hparams = {k: (dict(v) if isinstance(v, dict) else v) for k, v in module.hparams.items()}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "zigma": {"config": dict(module.model.config)}}, path)  # fmt: skip
    return path


def baseline_writer(commit: str, folder: Path):
    """The ``SampleWriter`` class of ``callbacks/samples.py`` at ``commit``."""
    source = subprocess.run(["git", "show", f"{commit}:callbacks/samples.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = folder / f"samples_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_samples_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SampleWriter


def child(job: dict) -> dict:
    """One measured run (in its own process): make ``count`` samples by ``mode``; returns the measurements."""
    torch.set_num_threads(job["threads"])
    import callbacks  # noqa: F401  (imports are not timed: every path pays them alike, once per process)
    import zigma_lightning.sample  # noqa: F401

    out = Path(job["out"])
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if job["mode"] == "sample":
        from zigma_lightning import sample

        argv = ["--ckpt", job["ckpt"], "--count", str(job["count"]), "--batch-size", str(job["batch"]),
                "--out", str(out), "--accelerator", "cpu"]  # fmt: skip
        assert sample.main(argv) == 0
    else:
        import lightning as L
        from torch.utils.data import DataLoader

        from datamodules.base import SampleRequests
        from zigma_lightning.sample_model import load_sampling_module

        if job["mode"] == "predict":
            from callbacks import SampleWriter
        else:
            SampleWriter = baseline_writer(job["baseline"], out.parent)
        module = load_sampling_module(job["ckpt"])
        writer = SampleWriter(output_dir=str(out), save_npz=True)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[writer])  # fmt: skip
        requests = DataLoader(SampleRequests(job["count"]), batch_size=job["batch"])
        trainer.predict(module, requests, return_predictions=False)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    import numpy as np

    with np.load(out / "samples.npz") as data:
        shape = list(data["arr_0"].shape)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall": wall, "cpu": cpu, "peak_mib": peak_kib / 1024, "shape": shape}


def measure(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{job['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=int, default=500, help="samples of the speed runs")
    parser.add_argument("--small", type=int, default=1000, help="samples of the small memory run")
    parser.add_argument("--large", type=int, default=20000, help="samples of the large memory run")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=2, help="Euler grid points (2: one model call)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-commit", default="18575f3", help="commit whose SampleWriter is the baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pixels = write_checkpoint(tmp / "quickstart.ckpt", args.steps)
        latent = write_checkpoint(tmp / "latent.ckpt", args.steps, write_tiny_vae(tmp / "vae"))
        tiny = write_checkpoint(tmp / "tiny.ckpt", args.steps, tiny=True)
        plan = [("quickstart", pixels, args.speed), ("latent + tiny VAE", latent, args.speed),
                ("quickstart (tiny)", tiny, args.small), ("quickstart (tiny)", tiny, args.large)]  # fmt: skip
        rows = []
        for model, ckpt, count in plan:
            for mode in MODES:  # interleaved: every mode of one setting runs back to back
                job = {"mode": mode, "ckpt": str(ckpt), "count": count, "batch": args.batch_size,
                       "out": str(tmp / f"{mode}_{model[:10]}_{count}"), "threads": args.threads,
                       "baseline": args.baseline_commit}  # fmt: skip
                result = measure(job)
                rows.append((model, count, mode, result))
                print(f"  {model} {count} {mode}: {result}", file=sys.stderr, flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"# sampling benchmark, {datetime.date.today()}, commit {commit.stdout.strip()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads, Euler {args.steps} points, batch {args.batch_size}, "
          f"baseline predict-old = SampleWriter of {args.baseline_commit}")  # fmt: skip
    print("| model | N | path | wall s | CPU s | samples/s | peak RSS MiB | x baseline (samples/s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    base = {}
    for model, count, mode, r in rows:
        rate = count / r["wall"]
        if mode == "predict-old":
            base[(model, count)] = rate
        print(f"| {model} | {count} | {mode} | {r['wall']:.1f} | {r['cpu']:.1f} | {rate:.0f} | {r['peak_mib']:.0f} "
              f"| {rate / base[(model, count)]:.2f} |")  # fmt: skip
    peaks = {(model, count, mode): r["peak_mib"] for model, count, mode, r in rows}
    print(f"\npeak RSS growth, quickstart (tiny), {args.small} -> {args.large} samples:")
    for mode in MODES:
        small, large = peaks[("quickstart (tiny)", args.small, mode)], peaks[("quickstart (tiny)", args.large, mode)]
        verdict = "" if mode == "predict-old" else ("  (< 5%: ok)" if large < 1.05 * small else "  (>= 5%: FAILS)")
        print(f"  {mode:<12} {small:.0f} -> {large:.0f} MiB: {100 * (large / small - 1):+.1f}%{verdict}")


if __name__ == "__main__":
    main()
