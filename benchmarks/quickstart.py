"""Quickstart benchmark: cost and sample quality of ``python cli.py fit --config configs/quickstart.yaml`` (the
README's first command after installation) and of the conditional ``configs/quickstart_digits.yaml``.

For each fit: the wall time and the CPU time (user + sys of the fit process and its children, which contention on
a shared machine inflates much less than wall time), the optimizer steps per second of wall time, and a learning
curve: every checkpoint the run saved is loaded, its EMA weights sample ``--num-samples`` images from fixed noise
with the config's sampler, and ``zigma.metrics.pixel_quality`` scores them against the training images (faces:
PCA Fréchet distance, nearest-neighbour distances, coverage, sharpness, patch-grid ratio, with the reals' floor).
Digits: a scikit-learn classifier trained on half of the real 8×8 digits labels samples drawn for each class;
its accuracy against the drawn labels is reported at each guidance scale (and on the other half of the reals).

    python benchmarks/quickstart.py                                  # the faces quickstart
    python benchmarks/quickstart.py --before HEAD~3                  # ... and the config of another commit first
    python benchmarks/quickstart.py --save-grid docs/quickstart_samples.png
    python benchmarks/quickstart.py --config configs/quickstart_digits.yaml --save-grid docs/quickstart_digits.png
    python benchmarks/quickstart.py --evaluate-run runs/quickstart/version_0 --config configs/quickstart.yaml

Targets (issue 17): fit <= 4 minutes on a 2-core CPU; faces people recognise (numbers close to the reals' floor).
"""

from __future__ import annotations

import argparse
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fit(configs: list[Path], save_dir: Path, extra: list[str]) -> dict:
    """Run ``cli.py fit`` once; its wall and CPU seconds and the run directory."""
    cmd = [sys.executable, "cli.py", "fit"] + [a for c in configs for a in ("--config", str(c))]
    cmd += ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false", *extra]
    cpu, start = children_cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"wall": time.perf_counter() - start, "cpu": children_cpu_seconds() - cpu,
            "run": next(save_dir.glob("*/version_*"))}  # fmt: skip


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's ``step{N}.ckpt`` files, by step."""
    found = [(int(re.search(r"(\d+)", p.stem).group(1)), p) for p in (run / "checkpoints").glob("step*.ckpt")]
    return sorted(found)


def load_module(path: Path):
    from zigma.flow_module import FlowMatchingModule

    return FlowMatchingModule.load_from_checkpoint(path, map_location="cpu").eval()


def sample(module, count: int, labels: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
    """(count, C, H, W) EMA samples in [-1, 1] from the fixed noise of indices 0..count-1 (seed 0)."""
    noise = module.noise(torch.arange(count), seed=0)
    return module.generate(noise, labels, guidance_scale=guidance).x.clamp(-1, 1)


def throughput(run: Path) -> float:
    """Mean optimizer steps per second of wall time over the run, from TensorBoard's ThroughputMonitor scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "train/device/batches_per_sec" not in tags:
        return float("nan")
    values = [e.value for e in acc.Scalars("train/device/batches_per_sec")]
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------------------- faces
def face_curve(run: Path, num_samples: int) -> tuple[list[tuple[int, dict]], dict]:
    """Quality of each checkpoint's samples, and the reals' floor."""
    from datamodules.embedded import load_lfw_faces
    from zigma.metrics.pixel_quality import quality_report, real_floor

    rows, patch = [], None
    faces = None
    for step, path in checkpoints(run):
        module = load_module(path)
        patch = module.model.config["patch_size"]
        faces = load_lfw_faces(module.model.img_dim) if faces is None else faces
        report = quality_report(sample(module, num_samples), faces, patch=max(patch, 2), mirror=True)
        rows.append((step, report.as_dict()))
    return rows, real_floor(faces, patch=max(patch, 2), mirror=True).as_dict()


FACE_COLUMNS = ("pca_fd", "nn_train", "nn_self", "coverage", "gradient_energy", "patch_edge_ratio")


def print_face_curve(label: str, rows: list[tuple[int, dict]], floor: dict) -> None:
    print(f"\n# learning curve: {label}")
    print("| step | " + " | ".join(FACE_COLUMNS) + " |")
    print("|---" * (len(FACE_COLUMNS) + 1) + "|")
    for step, r in [*rows, ("real floor", floor)]:
        print(f"| {step} | " + " | ".join(f"{r[c]:.3f}" for c in FACE_COLUMNS) + " |")


def face_figure(module, faces: torch.Tensor, path: Path, scale: int = 3) -> None:
    """36 EMA samples (6×6, the SampleGridLogger's fixed noise) beside 12 real training faces (6×2)."""
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    from callbacks.samples import image_grid

    samples = image_grid(sample(module, 36), nrow=6)
    reals = image_grid(faces[torch.randperm(len(faces), generator=torch.Generator().manual_seed(0))[:12]], nrow=2)
    gap = torch.ones(samples.shape[0], samples.shape[1], 6)
    figure = torch.cat([samples, gap, reals], dim=-1)
    image = to_pil_image(figure)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    write_png(image, path)


def write_png(image, path: Path) -> None:
    from zigma.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


# ------------------------------------------------------------------------------------------------------------ digits
def digit_classifier():
    """An RBF SVC on the first half of scikit-learn's 8×8 digits (0..16 scaled to [0, 1]); its accuracy on the
    second half."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    half = len(x) // 2
    classifier = SVC(gamma="scale").fit(x[:half], y[:half])
    return classifier, float(classifier.score(x[half:], y[half:]))


def to_digit_features(samples: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) in [-1, 1] -> (N, 64) in [0, 1]: area-downsampled to 8×8 like the classifier's inputs."""
    small = torch.nn.functional.adaptive_avg_pool2d(samples.float(), 8)
    return ((small + 1) / 2).clamp(0, 1).reshape(len(samples), 64)


def digit_accuracy(run: Path, per_class: int, scales: list[float]) -> tuple[list[tuple[int, dict]], float]:
    """Per checkpoint and guidance scale: the classifier's accuracy on ``per_class`` samples drawn for each digit."""
    classifier, ceiling = digit_classifier()
    labels = torch.arange(10).repeat_interleave(per_class)
    rows = []
    for step, path in checkpoints(run):
        module = load_module(path)
        row = {}
        for scale in scales:
            predicted = classifier.predict(to_digit_features(sample(module, len(labels), labels, scale)).numpy())
            row[f"w={scale:g}"] = float((torch.from_numpy(predicted) == labels).float().mean())
        rows.append((step, row))
    return rows, ceiling


def digits_figure(module, path: Path, guidance: float, per_class: int = 10, scale: int = 4) -> None:
    """One row per digit 0..9, ``per_class`` samples each, at guidance ``guidance``."""
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    from callbacks.samples import image_grid

    labels = torch.arange(10).repeat_interleave(per_class)
    image = to_pil_image(image_grid(sample(module, len(labels), labels, guidance), nrow=per_class))
    write_png(image.resize((image.width * scale, image.height * scale), Image.NEAREST), path)


# -------------------------------------------------------------------------------------------------------------- main
def config_at(revision: str, config: Path, directory: Path) -> Path:
    """The config file as it was at git ``revision`` (written under ``directory``)."""
    text = subprocess.run(["git", "show", f"{revision}:{config.relative_to(ROOT)}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = directory / f"{revision.replace('/', '_')}_{config.name}"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--before", help="also fit the config as it was at this git revision, first (baseline)")
    parser.add_argument("--evaluate-run", type=Path, help="evaluate this existing run directory instead of fitting")
    parser.add_argument("--num-samples", type=int, default=100, help="faces: samples per checkpoint")
    parser.add_argument("--per-class", type=int, default=10, help="digits: samples per class per checkpoint")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="digits: guidance scales")
    parser.add_argument("--save-grid", type=Path, help="write the final checkpoint's figure to this PNG")
    parser.add_argument("--keep", type=Path, help="keep the runs under this directory (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="extra cli.py arguments, e.g. --trainer.max_steps=100")
    args = parser.parse_args()
    config = args.config.resolve()
    digits = "digits" in config.stem

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        runs: list[tuple[str, dict]] = []
        if args.evaluate_run:
            runs.append((config.stem, {"run": args.evaluate_run, "wall": float("nan"), "cpu": float("nan")}))
        else:
            if args.before:
                old = config_at(args.before, config, Path(tmp))
                runs.append((f"{config.stem} @ {args.before}", fit([old], base / "before", args.extra)))
            runs.append((f"{config.stem} (this commit)", fit([config], base / "after", args.extra)))

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        print(f"# quickstart fit, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"commit {commit}")  # fmt: skip
        print("| config | steps | wall (s) | CPU user+sys (s) | steps/s (ThroughputMonitor) | fit <= 240 s |")
        print("|---|---|---|---|---|---|")
        for label, r in runs:
            steps = checkpoints(r["run"])[-1][0] if checkpoints(r["run"]) else 0
            print(f"| {label} | {steps} | {r['wall']:.0f} | {r['cpu']:.0f} | {throughput(r['run']):.2f} | "
                  f"{'MET' if r['wall'] <= 240 else 'NOT MET'} |")  # fmt: skip
        for label, r in runs:
            if digits:
                rows, ceiling = digit_accuracy(r["run"], args.per_class, args.guidance)
                print(f"\n# classifier accuracy on samples drawn per digit: {label} (real held-out: {ceiling:.3f})")
                names = list(rows[0][1]) if rows else []
                print("| step | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
                for step, row in rows:
                    print(f"| {step} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
            else:
                print_face_curve(label, *face_curve(r["run"], args.num_samples))
        if args.save_grid:
            final = load_module(checkpoints(runs[-1][1]["run"])[-1][1])
            if digits:
                digits_figure(final, args.save_grid, guidance=final.hparams.guidance_scale)  # the config's scale
            else:
                from datamodules.embedded import load_lfw_faces

                face_figure(final, load_lfw_faces(final.model.img_dim), args.save_grid)


if __name__ == "__main__":
    main()
