"""``python -m datamodules.prepare`` on tiny random images and the random AutoencoderKL of ``tests/conftest.py``
(downsample factor 2, 4 latent channels: resolution 16 gives (4, 8, 8) latents)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.manifest import check_manifest, read_manifest
from datamodules.prepare import prepare_from_argv, sample_generator, to_pixels
from zigma.images import resize_center_crop as center_crop
from zigma.vae import FrozenVAE

pytest.importorskip("diffusers", reason="prepare encodes with FrozenVAE (diffusers' AutoencoderKL)")

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m datamodules.prepare` runs from there

RES = 16
LATENT = (4, RES // 2, RES // 2)
GREEN = (0, 200, 0)
# (class, file name, (width, height)); the two striped images test the centre crop
IMAGES = [
    ("cat", "a.png", (24, 20)),
    ("cat", "b.jpg", (32, 32)),
    ("cat", "c.png", (20, 28)),
    ("cat", "d.jpg", (17, 23)),
    ("cat", "e.png", (40, 18)),
    ("cat", "wide.png", (32, 16)),
    ("dog", "a.png", (24, 20)),
    ("dog", "b.jpg", (16, 16)),
    ("dog", "c.png", (21, 30)),
    ("dog", "d.jpg", (64, 48)),
    ("dog", "e.png", (30, 30)),
    ("dog", "tall.png", (16, 32)),
]


def smooth_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random RGB image (JPEG keeps it close), ``size`` = (width, height)."""
    corners = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(corners).resize(size, Image.Resampling.BILINEAR)


def striped_image(size: tuple[int, int]) -> Image.Image:
    """Green centre square, red and blue bars outside it (left/right if wide, top/bottom if tall)."""
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[...] = GREEN
    if w > h:
        pixels[:, : (w - h) // 2] = (255, 0, 0)
        pixels[:, w - (w - h) // 2 :] = (0, 0, 255)
    else:
        pixels[: (h - w) // 2] = (255, 0, 0)
        pixels[h - (h - w) // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for seed, (cls, name, size) in enumerate(IMAGES):
        (src / cls).mkdir(parents=True, exist_ok=True)
        image = striped_image(size) if name.startswith(("wide", "tall")) else smooth_image(seed, size)
        image.save(src / cls / name, quality=98)
    return src


@pytest.fixture
def run(tiny_vae_dir):
    """``run(kind, src, out, *extra)``: the CLI with the tiny VAE, resolution 16, shards of 5, mean latents."""

    def _run(kind: str, src: Path, out: Path, *extra: str) -> dict:
        argv = [kind, str(src), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution", str(RES)]
        argv += ["--shard-size", "5", "--latents", "mean", "--quiet", *extra]
        return prepare_from_argv(argv)

    return _run


@pytest.fixture(scope="module")
def vae(tiny_vae_dir) -> FrozenVAE:
    return FrozenVAE(str(tiny_vae_dir))


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {suffix: bytes}} in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, suffix = info.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def all_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(out.glob("train-*.tar")):
        samples.update(read_tar(shard))
    return samples


def source_of(src: Path, sample: dict[str, bytes]) -> Path:
    return src / sample["src.txt"].decode()


def test_prepare_images_writes_shards_and_manifest(image_dir, tmp_path, run):
    out = tmp_path / "out"
    manifest = run("images", image_dir, out, "--labels", "folders")
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [len(read_tar(out / s)) for s in shards] == [5, 5, 2]
    samples = all_samples(out)
    assert list(samples) == [f"{i:08d}" for i in range(12)]
    for sample in samples.values():
        assert set(sample) == {"jpg", "latent.npy", "cls", "src.txt"}
        latent = npy(sample["latent.npy"])
        assert latent.shape == LATENT and latent.dtype == np.float32
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.size == (RES, RES)
        rel = sample["src.txt"].decode()
        assert int(sample["cls"]) == ["cat", "dog"].index(rel.split("/")[0])

    on_disk = read_manifest(str(out / "train-{000000..000002}.tar"))
    assert on_disk == json.loads((out / "manifest.json").read_text()) == manifest
    split = manifest["splits"]["train"]
    assert split["complete"] and split["count"] == 12 and split["bad"] == 0
    assert [s["count"] for s in split["shards"]] == [5, 5, 2]
    assert manifest["latent_shape"] == list(LATENT) and manifest["latents"] == "mean"
    assert manifest["num_classes"] == 2 and manifest["label_names"] == ["cat", "dog"]
    assert manifest["vae"]["scale"] == pytest.approx(0.18215) and manifest["latent_scaled"] is False
    assert manifest["keys"]["latent.npy"]["shape"] == list(LATENT) and manifest["resolution"] == RES
    assert split["command"].startswith("python -m datamodules.prepare images")
    assert not list(out.glob("*.tmp*"))
    check_manifest(manifest, sample_shape=LATENT, num_classes=2, context_dim=0,
                   vae_config=FrozenVAE(manifest["vae"]["name_or_path"]).config())  # fmt: skip


def test_prepare_images_are_center_cropped(image_dir, tmp_path, run):
    out = tmp_path / "out"
    run("images", image_dir, out, "--latents", "none", "--image-format", "png")
    striped = {s["src.txt"].decode(): s for s in all_samples(out).values()}
    for rel in ("cat/wide.png", "dog/tall.png"):
        with Image.open(io.BytesIO(striped[rel]["png"])) as image:
            pixels = np.asarray(image)
        assert pixels.shape == (RES, RES, 3)
        assert (pixels == GREEN).all(), f"{rel}: the crop is not the green centre square"
    for rel, sample in striped.items():  # every stored image is the preprocessing of its source (lossless png)
        with Image.open(image_dir / rel) as source, Image.open(io.BytesIO(sample["png"])) as stored:
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(center_crop(source, RES)))


def test_prepare_latents_match_encode_moments(image_dir, tmp_path, run, vae):
    out = tmp_path / "out"
    run("images", image_dir, out)
    samples = list(all_samples(out).values())
    crops = []
    for sample in samples:
        with Image.open(source_of(image_dir, sample)) as image:
            crops.append(center_crop(image, RES))
        with Image.open(io.BytesIO(sample["jpg"])) as stored:  # the jpg is that crop, up to JPEG error
            error = np.abs(np.asarray(stored, dtype=float) - np.asarray(crops[-1], dtype=float)).mean()
        assert error < 3, f"{sample['src.txt']}: stored jpg differs from the crop by {error}"
    mean, _ = vae.encode_moments(to_pixels(crops))  # (12, 4, 8, 8)
    stored = torch.from_numpy(np.stack([npy(s["latent.npy"]) for s in samples]))
    torch.testing.assert_close(stored, mean, rtol=1e-4, atol=1e-4)


def test_prepare_latent_modes(image_dir, tmp_path, run, vae):
    first = sorted(p for p in image_dir.rglob("*.*"))[0]
    with Image.open(first) as image:
        pixels = to_pixels([center_crop(image, RES)])
    mean, std = vae.encode_moments(torch.cat([pixels, pixels.flip(-1)]))  # (2, 4, 8, 8)
    close = dict(rtol=1e-4, atol=1e-4)

    m = run("images", image_dir, tmp_path / "moments", "--latents", "moments", "--dtype", "float16")
    sample = all_samples(tmp_path / "moments")["00000000"]
    assert set(m["keys"]) >= {"latent_mean.npy", "latent_std.npy"} and "latent.npy" not in sample
    assert npy(sample["latent_mean.npy"]).dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(npy(sample["latent_std.npy"])).float(), std[0], rtol=2e-3, atol=2e-3)

    run("images", image_dir, tmp_path / "sample", "--latents", "sample", "--seed", "3")
    z = npy(all_samples(tmp_path / "sample")["00000000"]["latent.npy"])
    expected = vae.sample_from_moments(mean[0], std[0], sample_generator(3, 0))
    torch.testing.assert_close(torch.from_numpy(z), expected, **close)

    m = run("images", image_dir, tmp_path / "flips", "--latents", "both-flips", "--seed", "3")
    z = npy(all_samples(tmp_path / "flips")["00000000"]["latent.npy"])
    assert z.shape == (2, *LATENT) and m["latent_shape"] == list(LATENT)
    gen = sample_generator(3, 0)
    torch.testing.assert_close(torch.from_numpy(z[0]), vae.sample_from_moments(mean[0], std[0], gen), **close)
    torch.testing.assert_close(torch.from_numpy(z[1]), vae.sample_from_moments(mean[1], std[1], gen), **close)


def test_prepare_resume_rewrites_only_missing_shards(image_dir, tmp_path, run):
    out = tmp_path / "out"
    run("images", image_dir, out, "--labels", "folders")
    shards = sorted(out.glob("train-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    leftover = out / "train-000001.tar.tmp"
    leftover.write_bytes(b"half a shard from a killed run")
    manifest = run("images", image_dir, out, "--labels", "folders")
    assert not leftover.exists()
    for p in shards:
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # same bytes: deterministic output, fixed tar mtimes
        if p != shards[1]:
            assert p.stat().st_mtime_ns == mtime, f"{p.name} was rewritten"
    assert manifest["splits"]["train"]["count"] == 12 and manifest["splits"]["train"]["complete"]

    with pytest.raises(ValueError, match="resolution"):  # other settings into the same directory are refused
        prepare_from_argv(
            ["images", str(image_dir), "--out", str(out), "--latents", "none", "--resolution", "8", "--quiet"]
        )


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar]


def test_prepare_rerun_rewrites_a_cut_or_short_shard_without_blaming_its_inputs(image_dir, tmp_path, run, caplog):
    # issue 13: a shard cut exactly between two tar members read as a whole tar of fewer samples, and the rerun
    # listed the rest of its (valid) inputs as unreadable and exited 0
    out = tmp_path / "out"
    run("images", image_dir, out, "--labels", "folders")
    shards = sorted(out.glob("train-*.tar"))
    before = {p.name: p.read_bytes() for p in shards}
    members = tar_members(shards[0])
    cut = next(info.offset for info, _ in members if info.name.startswith("00000003."))
    os.truncate(shards[0], cut)  # exactly between two members: no end-of-archive marker
    kept = tar_members(shards[1])[:12]  # 3 samples of 4 members each
    with tarfile.open(shards[1], "w") as tar:  # a whole tar of fewer samples than the manifest recorded (5)
        for info, data in kept:
            tar.addfile(info, io.BytesIO(data))
    dead = out / ".train-000002.tar.999999999-0a1b2c3d.tmp"  # a stale temporary file: pid 999999999 cannot run
    live = out / f".train-000002.tar.{os.getpid()}-0a1b2c3d.tmp"  # one of a process that still runs
    dead.write_bytes(b"part of a shard")
    live.write_bytes(b"part of a shard")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["complete"] = False  # as a rerun killed after it started leaves it: the per-shard
    (out / "manifest.json").write_text(json.dumps(manifest))  # counts of the last complete run are kept
    with caplog.at_level(logging.INFO, logger="zigma.data.prepare"):
        manifest = run("images", image_dir, out, "--labels", "folders")
    split = manifest["splits"]["train"]
    assert split["complete"] and split["count"] == 12 and split["bad"] == 0 and split["bad_paths"] == []
    assert [s["count"] for s in split["shards"]] == [5, 5, 2]
    assert {p.name: p.read_bytes() for p in shards} == before  # both rewritten, byte for byte
    assert f"{shards[0]} is damaged (no end-of-archive marker after byte {cut}" in caplog.text
    assert f"{shards[1]} holds 3 samples, the manifest recorded 5" in caplog.text
    assert "skipped unreadable input" not in caplog.text
    assert not dead.exists() and live.exists()


def descendants(pid: int) -> set[int]:
    """The pids of the processes under ``pid`` (children, their children, ...), from ``/proc``."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])  # fields after "(comm)": state, ppid, ...
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (not gone, not zombies)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
    return alive


@pytest.mark.slow  # a prepare subprocess with 2 workers: ~20 s of imports
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_prepare_workers_end_with_a_killed_parent_and_a_rerun_completes(image_dir, tmp_path):
    # issue 13: after a SIGKILL of a `--workers 2` prepare its workers kept running, writing under fixed temp names.
    # One input is a FIFO that nobody writes: the worker that reads it blocks in open() (like a hung network file
    # system), mid-shard, so the kill surely finds a worker at work.
    slow = image_dir / "slow.png"
    os.mkfifo(slow)
    rows = [*sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*.*") if p.is_file()), "slow.png"]
    (image_dir / "list.csv").write_text("path\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["images", str(image_dir / "list.csv"), "--out", str(out), "--latents", "none", "--resolution", "16",
            "--shard-size", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "datamodules.prepare", *argv, "--workers", "2"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    tree: set[int] = set()
    try:
        for _ in range(1200):  # the FIFO's shard (train-000006: 13 inputs) started: a worker is blocked in it
            if list(out.glob(".train-000006.tar.*.tmp")) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"prepare ended before the kill: {proc.stderr.read()}"
        tree = descendants(proc.pid)
        proc.kill()
        proc.wait()
        for _ in range(100):
            if not running(tree):
                break
            time.sleep(0.1)
        assert not running(tree), "processes of the killed prepare still run"
        assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # the workers removed their temp files
    finally:
        for pid in running(tree):  # only on failure: the processes this test started
            os.kill(pid, signal.SIGKILL)
        proc.stderr.close()
    slow.unlink()
    smooth_image(99, (20, 20)).save(slow)
    manifest = prepare_from_argv(argv)  # the rerun, in this process
    split = manifest["splits"]["train"]
    assert split["complete"] and split["count"] == 13 and split["bad"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"train-{i:06d}.tar" for i in range(7)]


def test_prepare_workers_match_single_worker(image_dir, tmp_path, run):
    one = run("images", image_dir, tmp_path / "one", "--latents", "sample", "--labels", "folders")
    two = run("images", image_dir, tmp_path / "two", "--latents", "sample", "--labels", "folders", "--workers", "2")
    assert one["splits"]["train"]["shards"] == two["splits"]["train"]["shards"]
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        a, b = read_tar(tmp_path / "one" / name), read_tar(tmp_path / "two" / name)
        assert list(a) == list(b)
        for key in a:
            assert a[key].keys() == b[key].keys()
            assert a[key]["jpg"] == b[key]["jpg"] and a[key]["cls"] == b[key]["cls"]
            np.testing.assert_allclose(npy(a[key]["latent.npy"]), npy(b[key]["latent.npy"]), rtol=1e-5, atol=1e-5)


def test_prepare_skips_corrupt_inputs(image_dir, tmp_path, run, caplog):
    (image_dir / "cat" / "broken.jpg").write_bytes(b"not an image")
    buffer = io.BytesIO()
    smooth_image(0, (20, 20)).save(buffer, format="PNG")
    (image_dir / "dog" / "truncated.png").write_bytes(buffer.getvalue()[:60])
    manifest = run("images", image_dir, tmp_path / "out", "--labels", "folders")
    split = manifest["splits"]["train"]
    assert split["count"] == 12 and split["bad"] == 2
    assert sorted(split["bad_paths"]) == ["cat/broken.jpg", "dog/truncated.png"]
    assert sum(s["count"] for s in split["shards"]) == 12 and len(split["shards"]) == 3  # 14 inputs
    assert "cat/broken.jpg" in caplog.text
    with pytest.raises(RuntimeError, match="--max-bad 1"):
        run("images", image_dir, tmp_path / "strict", "--max-bad", "1")


def test_check_manifest_rejects_mismatches(image_dir, tmp_path, run, tiny_vae_dir):
    manifest = run("images", image_dir, tmp_path / "out", "--labels", "folders")
    vae_config = FrozenVAE(str(tiny_vae_dir)).config()
    check_manifest(manifest, sample_shape=LATENT, vae_config=vae_config, num_classes=2, context_dim=0)
    with pytest.raises(ValueError, match=r"latent_shape: model \[4, 16, 16\], data \[4, 8, 8\]"):
        check_manifest(manifest, sample_shape=(4, 16, 16))
    with pytest.raises(ValueError, match=r"vae\.scale: model 0\.13025, data 0\.18215"):
        check_manifest(manifest, vae_config={**vae_config, "scale": 0.13025})
    with pytest.raises(ValueError, match="num_classes: model 10, data 2"):
        check_manifest(manifest, num_classes=10)
    with pytest.raises(ValueError, match="context_dim: model 768, data 0"):
        check_manifest(manifest, context_dim=768)
    with pytest.raises(ValueError, match=r"latent_shape.*num_classes"):  # one error naming every mismatch
        check_manifest(manifest, sample_shape=(4, 4, 4), num_classes=3)


def test_prepare_videos_from_frame_folders(tmp_path, run, vae):
    src = tmp_path / "videos"
    frames = {}
    for v, (cls, video) in enumerate([("jump", "v0"), ("jump", "v1"), ("walk", "v2")]):
        folder = src / cls / video
        folder.mkdir(parents=True)
        names = ["f1.png", "f2.png", "f10.png", "f11.png"]  # natural order; f10 sorts before f2 as text
        frames[f"{cls}/{video}"] = [smooth_image(10 * v + t, (20, 18)) for t in range(len(names))]
        for name, image in zip(names, frames[f"{cls}/{video}"]):
            image.save(folder / name)
    (src / "walk" / "v3").mkdir()  # too short: counted as bad
    smooth_image(99, (20, 18)).save(src / "walk" / "v3" / "f1.png")

    manifest = run("videos", src, tmp_path / "out", "--frames", "3", "--labels", "folders", "--frame-stride", "1")
    assert manifest["latent_shape"] == [3, *LATENT] and manifest["latent_key"] == "frame_feature256.npy"
    check_manifest(manifest, sample_shape=(2, *LATENT), num_classes=2)  # shorter clips are cropped from longer ones
    with pytest.raises(ValueError, match="latent_shape: model"):
        check_manifest(manifest, sample_shape=(4, *LATENT))
    assert manifest["splits"]["train"]["count"] == 3 and manifest["splits"]["train"]["bad_paths"] == ["walk/v3"]
    for sample in all_samples(tmp_path / "out").values():
        assert set(sample) == {"frame_feature256.npy", "cls", "src.txt"}
        rel = sample["src.txt"].decode()
        latent = torch.from_numpy(npy(sample["frame_feature256.npy"]))  # (T, C, h, w)
        assert latent.shape == (3, *LATENT)
        assert int(sample["cls"]) == ["jump", "walk"].index(rel.split("/")[0])
        clip = to_pixels([center_crop(im, RES) for im in frames[rel][:3]]).unsqueeze(0)  # (1, T, 3, S, S)
        mean, _ = vae.encode_moments(clip)
        torch.testing.assert_close(latent, mean[0], rtol=1e-4, atol=1e-4)


def test_prepare_caption_features_round_trip(tmp_path, run):
    rng = np.random.default_rng(0)
    rows, features = [], {}
    for i in range(4):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "cap").mkdir(exist_ok=True)
        smooth_image(i, (18, 16)).save(tmp_path / "img" / f"{i}.png")
        features[f"img/{i}.png"] = rng.standard_normal((2, 77, 8)).astype(np.float32)
        np.save(tmp_path / "cap" / f"{i}.npy", features[f"img/{i}.png"])
        rows.append({"path": f"img/{i}.png", "label": "ab"[i % 2], "caption_feature": f"cap/{i}.npy"})
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))

    manifest = run("images", listing, tmp_path / "out", "--labels", "list")
    assert manifest["caption_feature_shape"] == [2, 77, 8] and manifest["label_names"] == ["a", "b"]
    samples = all_samples(tmp_path / "out")
    assert len(samples) == 4
    for sample in samples.values():
        rel = sample["src.txt"].decode()
        np.testing.assert_array_equal(npy(sample["caption_feature.npy"]), features[rel])
        assert int(sample["cls"]) == int(rel[4]) % 2
    check_manifest(manifest, context_dim=8, num_classes=2)
    with pytest.raises(ValueError, match="context_dim: model 768, data 8"):
        check_manifest(manifest, context_dim=768)

    # a folder input joined with a caption list by path; ids from a classInd.txt-style names file ("<id> <name>")
    for i in range(4):
        (tmp_path / "img" / "ab"[i % 2]).mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.png").rename(tmp_path / "img" / "ab"[i % 2] / f"{i}.png")
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "path,caption_feature\n" + "".join(f"img/{'ab'[i % 2]}/{i}.png,cap/{i}.npy\n" for i in range(4))
    )
    names = tmp_path / "classInd.txt"
    names.write_text("1 b\n2 a\n")
    manifest = run("images", tmp_path / "img", tmp_path / "joined", "--labels", str(names), "--captions", str(captions))
    assert manifest["label_names"] == ["b", "a"] and manifest["caption_feature_shape"] == [2, 77, 8]
    for sample in all_samples(tmp_path / "joined").values():
        rel = sample["src.txt"].decode()  # a/0.png
        np.testing.assert_array_equal(npy(sample["caption_feature.npy"]), features[f"img/{rel[2:]}"])
        assert int(sample["cls"]) == ["b", "a"].index(rel[0])


def test_prepared_shards_load_in_web_datamodule(image_dir, tmp_path, run):
    from datamodules.webdataset import WebDataModule

    out = tmp_path / "out"
    manifest = run("images", image_dir, out, "--labels", "folders")
    data = WebDataModule(shards=str(out), kind="latent", latent_key=manifest["latent_key"], label_key="cls",
                         num_classes=manifest["num_classes"], batch_size=4, num_workers=0)  # fmt: skip
    check_manifest(manifest, sample_shape=data.sample_shape, num_classes=data.num_classes)
    batch = next(iter(data.train_dataloader()))
    assert batch["x"].shape == (4, *LATENT) and batch["y"].shape == (4,)


def test_prepare_rejects_bad_settings(image_dir, tmp_path, run):
    with pytest.raises(ValueError, match="not divisible"):
        run("images", image_dir, tmp_path / "a", "--resolution", "15")
    with pytest.raises(ValueError, match="not in a class folder"):
        (image_dir / "loose.png").write_bytes((image_dir / "cat" / "a.png").read_bytes())
        run("images", image_dir, tmp_path / "b", "--labels", "folders")
    os.remove(image_dir / "loose.png")
    with pytest.raises(ValueError, match="both-flips"):
        run("videos", image_dir, tmp_path / "c", "--latents", "both-flips")


def test_main_prints_one_error_line_and_returns_1(image_dir, tmp_path, capsys):
    from datamodules.prepare import main

    assert main(["images", str(image_dir), "--out", str(tmp_path / "o"), "--latents", "none", "--no-images"]) == 1
    assert capsys.readouterr().err == "error: --latents none with --no-images would write empty samples\n"
