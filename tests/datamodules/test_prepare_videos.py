"""``prepare videos`` from container files (PyAV) and UCF101's split lists, on tiny videos written here with PyAV and
the random AutoencoderKL of ``tests/conftest.py`` (resolution 16 gives (T, 4, 8, 8) latents).

Frame ``t`` of a test video is a smooth random colour image plus ``25 * t`` (24x16 pixels), so every decoded frame
tells which frame it is, and a swapped colour channel or a wrong frame is far outside the codecs' error.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.manifest import check_manifest, read_manifest
from datamodules.prepare import main, prepare_from_argv, to_pixels
from datamodules.prepare.inputs import list_inputs
from datamodules.prepare.videos import decode_video
from datamodules.webdataset import VideoWebDataModule
from tests.datamodules.test_prepare import LATENT, RES, ROOT, npy, read_tar
from zigma.images import resize_center_crop
from zigma.vae import FrozenVAE

av = pytest.importorskip("av", reason="video files are decoded with PyAV (the 'video' extra)")

W, H = 24, 16
# (file suffix, codec, pixel format, encoder options): high quality, so a decoded frame is within a few levels
CODECS = [
    (".avi", "mjpeg", "yuvj444p", {"qmin": "1", "qmax": "2"}),
    (".avi", "mpeg4", "yuv420p", {"qmin": "1", "qmax": "2"}),  # UCF101's own codec (xvid) is MPEG-4 part 2
    (".mp4", "libx264", "yuv444p", {"crf": "5"}),
    (".webm", "libvpx-vp9", "yuv444p", {"crf": "5", "b": "0"}),
    (".mkv", "ffv1", "yuv444p", {}),
]


def has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # UnknownCodecError: this PyAV wheel's FFmpeg lacks it
        return False
    return True


def clip_frames(count: int, seed: int = 0) -> np.ndarray:
    """(count, H, W, 3) uint8: a smooth random colour image times 0.4, plus 25 * t in frame t (no clipping)."""
    corners = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(corners).resize((W, H), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.stack([(base * 0.4 + 25 * t).astype(np.uint8) for t in range(count)])


def write_video(path: Path, frames: np.ndarray, codec: str = "mjpeg", pix_fmt: str = "yuvj444p",
                options: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Encode (N, H, W, 3) uint8 RGB frames at 25 fps into ``path`` (the container from its suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options or {"qmin": "1", "qmax": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


def crops(frames: np.ndarray) -> np.ndarray:
    """The RES x RES centre crops of (N, H, W, 3) frames, as images are cropped."""
    return np.stack([np.asarray(resize_center_crop(Image.fromarray(f), RES)) for f in frames])


@pytest.mark.parametrize(("suffix", "codec", "pix_fmt", "options"), CODECS, ids=[f"{c[1]}{c[0]}" for c in CODECS])
def test_decoded_frames_are_the_written_frames_strided_and_cropped(tmp_path, suffix, codec, pix_fmt, options):
    if not has_encoder(codec):
        pytest.skip(f"this PyAV wheel has no {codec} encoder")
    frames = clip_frames(7)
    path = write_video(tmp_path / f"v{suffix}", frames, codec, pix_fmt, options)
    got = np.stack([np.asarray(im) for im in decode_video(path, frames=3, stride=3, resolution=RES)])
    assert got.shape == (3, RES, RES, 3) and got.dtype == np.uint8
    expected = crops(frames[0:7:3]).astype(int)  # frames 0, 3, 6
    error = np.abs(got.astype(int) - expected).mean(axis=(1, 2, 3))
    assert (error < 4).all(), f"mean error per frame {error} (frames are 25 levels apart)"
    with pytest.raises(ValueError, match=r"^7 frames; --frames 4 --frame-stride 3 need 10$"):
        decode_video(path, frames=4, stride=3, resolution=RES)


# A UCF101-like tree: UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt.
# classInd's order is not alphabetical, so the ids can only come from it.
CLASSES = ["YoYo", "ApplyEyeMakeup"]
TRAIN = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "YoYo/v_YoYo_g08_c01.avi", "YoYo/v_YoYo_g09_c02.avi"]
TEST = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]
SHORT = "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi"  # 4 frames; 3 frames at stride 2 need 5
CORRUPT = "YoYo/v_YoYo_g10_c01.avi"  # not a video
CUT = "YoYo/v_YoYo_g11_c01.avi"  # a valid file cut to 30% of its bytes


@pytest.fixture
def ucf(tmp_path: Path) -> Path:
    """``tmp_path`` holding ``UCF-101/`` and ``ucfTrainTestlist/``; returns ``tmp_path``."""
    root = tmp_path / "UCF-101"
    for seed, rel in enumerate(TRAIN + TEST):
        codec = ("mpeg4", "yuv420p") if seed % 2 else ("mjpeg", "yuvj444p")  # UCF101's xvid, and Motion JPEG
        write_video(root / rel, clip_frames(6, seed), *codec)
    write_video(root / SHORT, clip_frames(4))
    (root / CORRUPT).write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video")
    whole = write_video(tmp_path / "whole.avi", clip_frames(6)).read_bytes()
    (root / CUT).write_bytes(whole[: len(whole) * 3 // 10])
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(CLASSES, 1)))
    trainlist = [*TRAIN, SHORT, CORRUPT, CUT]
    (lists / "trainlist01.txt").write_text(
        "".join(f"{rel} {CLASSES.index(rel.split('/')[0]) + 1}\r\n" for rel in trainlist)  # CRLF as UCF101's
    )
    (lists / "testlist01.txt").write_text("".join(f"{rel}\r\n" for rel in TEST))
    return tmp_path


@pytest.fixture
def run(tiny_vae_dir):
    """``run(src, out, *extra)``: ``prepare videos`` with the tiny VAE, resolution 16, 3 frames at stride 2."""

    def _run(src: Path, out: Path, *extra: str) -> dict:
        argv = ["videos", str(src), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution", str(RES),
                "--frames", "3", "--frame-stride", "2", "--shard-size", "2", "--latents", "mean", "--quiet",
                *extra]  # fmt: skip
        return prepare_from_argv(argv)

    return _run


def test_ucf101_split_files_give_the_inputs_labels_and_split(ucf, run, tiny_vae_dir, caplog):
    lists, out = ucf / "ucfTrainTestlist", ucf / "shards"
    with caplog.at_level(logging.WARNING, logger="zigma.data.prepare"):
        manifest = run(ucf / "UCF-101", out, "--split-file", str(lists / "trainlist01.txt"),
                       "--class-index", str(lists / "classInd.txt"))  # fmt: skip
    train = manifest["splits"]["train"]
    assert manifest["label_names"] == CLASSES and manifest["latent_shape"] == [3, *LATENT]
    assert train["count"] == 3 and train["bad"] == 3 and sorted(train["bad_paths"]) == sorted([SHORT, CORRUPT, CUT])
    for rel in (SHORT, CORRUPT, CUT):
        assert f"skipped unreadable input {rel}" in caplog.text
    assert f"skipped unreadable input {SHORT}: ValueError: 4 frames; --frames 3 --frame-stride 2 need 5" in caplog.text

    manifest = run(ucf / "UCF-101", out, "--split-file", str(lists / "testlist01.txt"),
                   "--class-index", str(lists / "classInd.txt"), "--split", "test")  # fmt: skip
    assert manifest["splits"]["test"]["count"] == 2 and manifest["splits"]["test"]["bad"] == 0
    assert read_manifest(out)["splits"]["train"]["count"] == 3  # both splits in one directory

    vae = FrozenVAE(str(tiny_vae_dir))
    for split, videos in (("train", TRAIN), ("test", TEST)):
        samples = {}
        for shard in sorted(out.glob(f"{split}-*.tar")):
            samples.update(read_tar(shard))
        assert sorted(s["src.txt"].decode() for s in samples.values()) == sorted(videos)
        for sample in samples.values():
            rel = sample["src.txt"].decode()
            assert int(sample["cls"]) == CLASSES.index(rel.split("/")[0])  # classInd's id minus one
            clip = decode_video(ucf / "UCF-101" / rel, 3, 2, RES)
            mean, _ = vae.encode_moments(to_pixels(clip).unsqueeze(0))  # (1, T, C, h, w)
            torch.testing.assert_close(torch.from_numpy(npy(sample["frame_feature256.npy"])), mean[0])

    # the shards load with configs/data/ucf101_latents.yaml's keys
    data = yaml.safe_load((ROOT / "configs" / "data" / "ucf101_latents.yaml").read_text())["data"]["init_args"]
    module = VideoWebDataModule(shards=str(out / "train-{000000..000001}.tar"), video_key=data["video_key"],
                                label_key=data["label_key"], num_classes=2, video_frames=3, batch_size=3,
                                num_workers=0)  # fmt: skip
    module.trainer = SimpleNamespace(global_rank=0, world_size=1)
    check_manifest(read_manifest(out), sample_shape=module.sample_shape, num_classes=module.num_classes)
    (batch,) = list(module.train_dataloader())
    assert batch["x"].shape == (3, 3, *LATENT) and sorted(batch["y"].tolist()) == [0, 0, 1]

    with pytest.raises(RuntimeError, match=r"^4 unreadable inputs, more than --max-bad 2"):
        (ucf / "UCF-101" / TRAIN[0]).write_bytes(b"")  # a fourth bad video in the list
        run(ucf / "UCF-101", ucf / "strict", "--split-file", str(lists / "trainlist01.txt"), "--max-bad", "2")


def test_a_folder_lists_video_files_and_frame_folders_and_labels_them_by_folder(tmp_path):
    src = tmp_path / "videos"
    write_video(src / "run" / "a.mp4", clip_frames(2), "ffv1", "yuv444p", {})
    write_video(src / "run" / "b.MKV", clip_frames(2), "ffv1", "yuv444p", {})
    (src / "jump" / "c").mkdir(parents=True)  # a frame folder
    Image.fromarray(clip_frames(1)[0]).save(src / "jump" / "c" / "f1.png")
    (src / "jump" / ".hidden.avi").write_bytes(b"")
    (src / "jump" / "notes.txt").write_text("not a video")
    inputs = list_inputs(src, "videos", labels="folders")
    assert [it.rel for it in inputs.items] == ["jump/c", "run/a.mp4", "run/b.MKV"]
    assert [it.label for it in inputs.items] == [0, 1, 1] and inputs.label_names == ["jump", "run"]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("missing split file", r"--split-file .*/nope\.txt: no such file"),
        ("missing class index", r"--class-index .*/nope\.txt: no such file"),
        ("label disagrees", r"trainlist01\.txt:2: label 1 but the video is in class 'ApplyEyeMakeup' \(id 2 in"),
        ("unknown class", r"testlist01\.txt:1: 'Nope/v\.avi' is not in a class folder of --class-index"),
        ("bad class index", r"classInd\.txt:2: expected '<id> <ClassName>'"),
        ("wrong SRC", r"none of its 5 videos is under SRC=.*ucfTrainTestlist.*SRC must be the folder that holds"),
        ("labels twice", r"--class-index gives the labels .*; drop --labels folders"),
    ],
)
def test_split_file_mistakes_are_one_line_errors(ucf, tiny_vae_dir, capsys, case, error):
    lists = ucf / "ucfTrainTestlist"
    split, index, src, extra = lists / "trainlist01.txt", lists / "classInd.txt", ucf / "UCF-101", []
    if case == "missing split file":
        split = lists / "nope.txt"
    elif case == "missing class index":
        index = lists / "nope.txt"
    elif case == "label disagrees":
        split.write_text(f"{TRAIN[1]} 1\n{TRAIN[0]} 1\n")
    elif case == "unknown class":
        split = lists / "testlist01.txt"
        split.write_text("Nope/v.avi\n")
    elif case == "bad class index":
        index.write_text("1 YoYo\nApplyEyeMakeup\n")
    elif case == "wrong SRC":
        src = lists
        split.write_text("".join(f"{rel}\n" for rel in [*TRAIN, *TEST]))
    else:
        extra = ["--labels", "folders"]
    argv = ["videos", str(src), "--out", str(ucf / "out"), "--vae", str(tiny_vae_dir), "--resolution", str(RES),
            "--split-file", str(split), "--class-index", str(index), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(error, err), err
    assert not (ucf / "out").exists() or not list((ucf / "out").glob("*.tar"))


def test_video_files_without_pyav_name_the_extra(ucf, tiny_vae_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ModuleNotFoundError
    argv = ["videos", str(ucf / "UCF-101"), "--out", str(ucf / "out"), "--vae", str(tiny_vae_dir), "--quiet",
            "--resolution", str(RES)]  # fmt: skip
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        'error: decoding video files: av is not installed: pip install "zigma-lightning[video]" (from a clone: '
        'pip install -e ".[video]", or pip install -r requirements.txt)\n'
    )
