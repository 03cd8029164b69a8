"""Real-data round trips through the tools a user runs: ``python -m datamodules.prepare`` -> shards + manifest ->
``WebDataModule`` / ``VideoWebDataModule`` -> ``python cli.py fit`` for a few steps (issue 5, deliverable 7)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.e2e.helpers import ROOT, run_cli, tensorboard_scalars

pytestmark = pytest.mark.slow
SHARDS = ["--config", "tests/e2e/shards.yaml"]


def prepare(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "datamodules.prepare", *args, "--quiet"], cwd=ROOT, check=True,
                   capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """8 of the embedded LFW faces (scikit-image) as RGB PNGs in two class folders, cropped to different sizes so
    the tool must resize and center-crop them to 16x16."""
    from skimage.data import lfw_subset

    root = tmp_path_factory.mktemp("images")
    faces = (lfw_subset()[:8] * 255).round().astype(np.uint8)  # (8, 25, 25) grayscale in [0, 255]
    for i, face in enumerate(faces):
        folder = root / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(exist_ok=True)
        Image.fromarray(face[: 25 - i % 3]).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def latent_shards(image_folder, tiny_vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_shards")
    prepare("images", str(image_folder), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution", "16",
            "--shard-size", "4", "--labels", "folders")  # fmt: skip
    return out


def fit(*args: str, runs, check=True):
    return run_cli("fit", *SHARDS, *args, runs=runs, check=check, timeout=300)


def last_step(runs) -> int:
    ckpt = next(runs.glob("shards/version_*/checkpoints/last.ckpt"))
    return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]


def test_prepare_writes_shards_and_a_manifest(latent_shards):
    manifest = json.loads((latent_shards / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["num_classes"] == 2
    assert sorted(p.name for p in latent_shards.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_latent_shards_with_labels_train(latent_shards, tiny_vae_dir, tmp_path):
    fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", str(latent_shards),
        "--data.init_args.latent_key", "latent.npy", "--data.init_args.label_key", "cls",
        "--data.init_args.num_classes", "2", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--model.net.num_classes", "2", "--model.vae", str(tiny_vae_dir), runs=tmp_path)  # fmt: skip
    assert last_step(tmp_path) == 2


def test_image_shards_are_encoded_by_the_vae_during_training(latent_shards, tiny_vae_dir, tmp_path):
    fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", str(latent_shards),
        "--data.init_args.kind", "image", "--data.init_args.resolution", "16", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--model.vae", str(tiny_vae_dir), runs=tmp_path)  # fmt: skip
    assert last_step(tmp_path) == 2


def test_fid_of_a_latent_model_is_measured_against_the_shards_images(latent_shards, tiny_vae_dir,
                                                                      random_inception_weights, tmp_path):  # fmt: skip
    """Latent training shards also hold the original JPEGs: they are the FID reals; the fakes are VAE-decoded."""
    shards = str(latent_shards / "train-{000000..000001}.tar")
    cache = tmp_path / "cache"
    fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", shards, "--data.init_args.val_shards", shards,
        "--data.init_args.latent_key", "latent.npy", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--model.vae", str(tiny_vae_dir), "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2", "--fid.num_samples", "4", "--fid.batch_size", "2", "--fid.feature", "64",
        "--fid.sample_steps", "2", "--fid.weights_path", str(random_inception_weights), "--fid.reference", shards,
        "--fid.reference_key", "jpg", "--fid.reference_count", "8", "--fid.reference_cache_dir", str(cache),
        runs=tmp_path)  # fmt: skip
    logged = tensorboard_scalars(tmp_path / "shards")
    assert [step for step, _ in logged["val/fid_4"]] == [step for step, _ in logged["val/loss"]]
    assert np.isfinite(logged["val/fid_4"][0][1]) and logged["val/fid_samples"][0][1] == 4
    from zigma.metrics.frechet import GaussianStats

    (stats_file,) = cache.glob("*.npz")
    meta = GaussianStats.load(stats_file).meta
    assert meta["dataset"].startswith("shards:") and meta["count"] == 8 and meta["resolution"] == 16


def test_caption_shards_train_a_text_model(image_folder, tiny_vae_dir, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    rows = []
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))):
        np.save(features / f"{i}.npy", np.random.default_rng(i).standard_normal((2, 5, 8)).astype(np.float32))
        rows.append({"path": str(path), "caption_feature": str(features / f"{i}.npy")})
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "text_shards"
    prepare("images", str(listing), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution", "16",
            "--shard-size", "4")  # fmt: skip
    fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", str(out),
        "--data.init_args.latent_key", "latent.npy", "--data.init_args.caption_key", "caption_feature.npy",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--model.net.has_text", "true",
        "--model.net.d_context", "8", "--model.vae", str(tiny_vae_dir), runs=tmp_path)  # fmt: skip
    assert last_step(tmp_path) == 2


def test_video_frame_folders_train_a_factorised_zigzag_video_model(tiny_vae_dir, tmp_path):
    rng = np.random.default_rng(1)
    for v in range(4):
        clip = tmp_path / "videos" / ("run" if v % 2 else "jump") / f"clip{v}"
        clip.mkdir(parents=True)
        for f in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(clip / f"f{f}.png")
    out = tmp_path / "video_shards"
    prepare("videos", str(tmp_path / "videos"), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution", "16",
            "--frames", "3", "--shard-size", "2", "--labels", "folders")  # fmt: skip
    fit("--data", "datamodules.VideoWebDataModule", "--data.init_args.shards", str(out),
        "--data.init_args.video_frames", "3", "--data.init_args.label_key", "cls", "--data.init_args.num_classes", "2",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--model.net.video_frames", "3",
        "--model.net.scan_type", "zzvideo_sst", "--model.net.num_classes", "2", runs=tmp_path)  # fmt: skip
    assert last_step(tmp_path) == 2


def test_manifest_rejects_a_mismatched_model(latent_shards, tiny_vae_dir, tmp_path):
    proc = fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", str(latent_shards),
               "--data.init_args.latent_key", "latent.npy", "--data.init_args.batch_size", "2",
               "--data.init_args.num_workers", "0", "--model.vae", str(tiny_vae_dir), "--model.vae_scale", "0.5",
               runs=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "does not match the data's manifest" in proc.stderr and "scale" in proc.stderr


def test_a_damaged_sample_past_the_budget_stops_fit_with_one_line(latent_shards, tiny_vae_dir, tmp_path):
    """One latent in the second shard is garbage and ``max_bad_samples=0``: the run (which must reach that shard:
    4 steps of 2 over 7 good samples) exits 1 with one ``error:`` line naming the budget and the shard, no traceback."""
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(latent_shards, shards)
    damaged = shards / "train-000001.tar"
    with tarfile.open(damaged) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_latent = next(m.name for m, _ in members if m.name.endswith("latent.npy"))
    with tarfile.open(damaged, "w") as tar:
        for member, data in members:
            if member.name == first_latent:
                data = b"garbage".ljust(len(data), b"\0")  # same size: the tar is whole, one sample is not
            tar.addfile(member, io.BytesIO(data))
    proc = fit("--data", "datamodules.WebDataModule", "--data.init_args.shards", str(shards),
               "--data.init_args.latent_key", "latent.npy", "--data.init_args.batch_size", "2",
               "--data.init_args.num_workers", "0", "--data.init_args.max_bad_samples", "0",
               "--model.vae", str(tiny_vae_dir), "--trainer.max_steps", "4", runs=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert "more than max_bad_samples=0" in errors[0] and "train-000001.tar" in errors[0], errors[0]
