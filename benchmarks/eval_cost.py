"""What an in-training FID costs: seconds per 1,000 FID samples for the quickstart model, Euler vs dopri5.

For each sampler, ``--samples`` EMA samples of the quickstart model are generated in batches of ``--batch-size`` from
the fixed noise the FID callback uses (``FlowMatchingModule.noise`` by global index), converted to uint8 and passed
through FID's Inception-v3 (torch-fidelity's ``inception-v3-compat`` via ``zigma.metrics.load_inception``, 2048-d,
TF1-compatible resize to 299 px): exactly the per-sample work of ``callbacks.FIDEvaluation``. Reported per sampler:
NFE per trajectory (``SampleResult.nfe``, max over batches), sampling and Inception seconds, and their sum scaled to
1,000 samples. The fixed cost of one evaluation, the 2048-d Fréchet distance (``torchmetrics`` ``compute``), is
timed once. The baseline row is Euler with 25 steps (25 NFE); every ``x baseline`` refers to it.

The model is the quickstart checkpoint given by ``--ckpt`` (default: the ``runs/quickstart/*/checkpoints/last.ckpt``
with the most steps, from ``python cli.py fit --config configs/quickstart.yaml``); the adaptive solver's NFE depends
on the trained velocity field, so an untrained model is only used with ``--random-init`` and the table says so.
Inception weights: ``--inception-weights`` (the real file); without it the same architecture with random weights is
timed (the cost does not depend on the weight values, and no FID value is reported).

    python benchmarks/eval_cost.py                      # 2-core CPU: a few minutes
    python benchmarks/eval_cost.py --samples 100 --random-init   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SAMPLERS = (("euler", 26, "Euler, 25 steps"), ("dopri5", None, "dopri5 (atol 1e-6, rtol 1e-3)"))


def longest_trained_quickstart_checkpoint() -> Path | None:
    """The ``last.ckpt`` under ``runs/quickstart`` with the most optimizer steps (test runs there are short)."""
    found = list((ROOT / "runs" / "quickstart").glob("*/checkpoints/last.ckpt"))
    steps = {p: torch.load(p, map_location="cpu", weights_only=False, mmap=True)["global_step"] for p in found}
    return max(found, key=lambda p: (steps[p], p.stat().st_mtime)) if found else None


def load_module(ckpt: Path | None):
    import yaml

    from zigma.flow_module import FlowMatchingModule

    if ckpt is not None:
        return FlowMatchingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]
    torch.manual_seed(0)
    return FlowMatchingModule(**config).eval()


def inception(weights: str | None):
    from zigma.metrics.inception import load_inception

    if weights is not None:
        return load_inception(weights), True
    from tests.stand_ins import write_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        return load_inception(write_random_inception_weights(Path(tmp))), False


def measure(module, extractor, method: str, steps: int | None, samples: int, batch_size: int) -> dict:
    from zigma.metrics.inception import to_uint8

    sample_s = inception_s = 0.0
    nfe = 0
    features = []
    for chunk in torch.arange(samples).split(batch_size):
        start = time.perf_counter()
        result = module.generate(module.noise(chunk, seed=0), method=method, num_steps=steps)
        pixels = module.decode(result.x)
        sample_s += time.perf_counter() - start
        if not torch.isfinite(pixels).all():
            raise FloatingPointError(f"{method}: non-finite samples")
        nfe = max(nfe, int(result.nfe))
        start = time.perf_counter()
        features.append(extractor(to_uint8(pixels)))
        inception_s += time.perf_counter() - start
    return {"nfe": nfe, "sample_s": sample_s, "inception_s": inception_s, "features": torch.cat(features)}


def fid_compute_seconds(features: torch.Tensor) -> float:
    """Seconds of one 2048-d torchmetrics FID ``compute`` (the fixed cost of an evaluation)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = features.shape[1]

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity(), reset_real_features=False, normalize=False)
    metric.update(features.double(), real=True)
    metric.update(features.double().flip(0) + 0.01, real=False)
    start = time.perf_counter()
    metric.compute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="default: the longest-trained quickstart run's")
    parser.add_argument("--random-init", action="store_true", help="allow an untrained model if no checkpoint")
    parser.add_argument("--inception-weights", default=None, help="the real Inception .pth (else random weights)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt or longest_trained_quickstart_checkpoint()
    if ckpt is None and not args.random_init:
        parser.error("no quickstart checkpoint: run `python cli.py fit --config configs/quickstart.yaml` or pass "
                     "--random-init")  # fmt: skip
    module = load_module(ckpt)
    extractor, real_weights = inception(args.inception_weights)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"# eval_cost  {datetime.date.today()}  commit {commit.strip()}  torch {torch.__version__}  "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"# model: {ckpt or 'quickstart config, random init (untrained)'}; Inception weights: "
          f"{'real' if real_weights else 'random (same architecture)'}; {args.samples} samples, batch "
          f"{args.batch_size}")  # fmt: skip
    rows = []
    with torch.inference_mode():
        for method, steps, label in SAMPLERS:
            rows.append((label, measure(module, extractor, method, steps, args.samples, args.batch_size)))
    compute_s = fid_compute_seconds(rows[0][1]["features"])
    base = None
    print("| sampler | NFE | sampling s / 1k | Inception s / 1k | total s / 1k | x baseline |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        scale = 1000 / args.samples
        total = (r["sample_s"] + r["inception_s"]) * scale
        base = base or total
        print(f"| {label} | {r['nfe']} | {r['sample_s'] * scale:.1f} | {r['inception_s'] * scale:.1f} | "
              f"{total:.1f} | {total / base:.2f}x |")  # fmt: skip
    print(f"\nFixed cost per evaluation: 2048-d FID compute (torchmetrics, float64) {compute_s:.1f} s")


if __name__ == "__main__":
    main()
