"""``prepare videos`` from container files: decoder choice (PyAV vs torchcodec) and videos/s encoded to latents on CPU.

Synthetic UCF101-like videos are written to a temporary directory: 320x240, 25 fps, MPEG-4 part 2 (UCF101's xvid
codec) in ``.avi``, ``--length`` frames of a moving smooth pattern.

1. Decoding the clip ``prepare`` takes (the first ``--frames`` frames, every ``--stride``-th) to uint8 RGB, per video,
   with PyAV (``av``, what ``datamodules.prepare.videos`` uses) and with torchcodec (when it imports and runs; it
   needs FFmpeg's shared libraries on the loader path, which PyAV's wheel does not provide to others).
2. ``prepare videos`` end to end (decode, resize + centre crop to ``--resolution``, a tiny random VAE's latents loaded
   through ``FrozenVAE`` from a temporary directory, shards written), one worker, against the named baseline: the same
   clips as folders of JPEG frames (quality 95), the only input ``prepare videos`` read before.

Rounds are interleaved (baseline, new, baseline, new, ...); wall time and this process's CPU time
(``time.process_time``, all threads) are reported, the median over rounds.

    python benchmarks/prepare_videos.py                 # prints two tables
    python benchmarks/prepare_videos.py --videos 32 --resolution 128
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def moving_pattern(length: int, width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """(length, height, width, 3) uint8: a smooth random colour field that drifts 3 pixels per frame."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width * 2, height), 2)
    wide = np.asarray(field)
    return np.stack([wide[:, 3 * t % width : 3 * t % width + width] for t in range(length)])


def write_avi(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25, options={"qmin": "2", "qmax": "5"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def decode_pyav(path: Path, frames: int, stride: int) -> np.ndarray:
    import av

    kept = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index % stride == 0:
                kept.append(frame.to_ndarray(format="rgb24"))
                if len(kept) == frames:
                    break
    return np.stack(kept)  # (T, H, W, 3)


def decode_torchcodec(path: Path, frames: int, stride: int) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), device="cpu", seek_mode="approximate")  # no full scan of the file
    batch = decoder.get_frames_in_range(0, (frames - 1) * stride + 1, stride)  # (T, 3, H, W) uint8
    return batch.data.permute(0, 2, 3, 1).numpy()


def torchcodec_problem() -> str | None:
    """None if torchcodec decodes here, else the first line of why not."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[0] if lines else err}"
    return None


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_pair(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--length", type=int, default=180, help="frames per video (UCF101: 186 on average)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="prepare_videos_") as tmp:
        run_benchmark(args, Path(tmp))


def run_benchmark(args: argparse.Namespace, work: Path) -> None:
    import torch

    from datamodules.prepare import prepare_from_argv
    from tests.stand_ins import write_tiny_vae

    videos = work / "UCF-101" / "Synthetic"
    videos.mkdir(parents=True)
    for v in range(args.videos):
        write_avi(videos / f"v_Synthetic_g{v:02d}_c01.avi", moving_pattern(args.length, seed=v))
    files = sorted(videos.glob("*.avi"))
    need = (args.frames - 1) * args.stride + 1

    # 1. decoders
    problem = torchcodec_problem()
    decoders = {"PyAV " + __import__("av").__version__: decode_pyav}
    if problem is None:
        import torchcodec

        decoders["torchcodec " + torchcodec.__version__] = decode_torchcodec
        reference = [decode_pyav(f, args.frames, args.stride) for f in files[:2]]
        for f, ref in zip(files, reference):
            got = decode_torchcodec(f, args.frames, args.stride)
            assert got.shape == ref.shape and np.abs(got.astype(int) - ref.astype(int)).mean() < 2, "decoders disagree"
    decode_times: dict[str, list[tuple[float, float]]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, decode in decoders.items():
            decode_times[name].append(timed(lambda d=decode: [d(f, args.frames, args.stride) for f in files]))

    # 2. prepare videos end to end, against frame folders of the same clips
    from PIL import Image

    frames_root = work / "frames" / "Synthetic"
    for f in files:
        folder = frames_root / f.stem
        folder.mkdir(parents=True)
        for t, frame in enumerate(decode_pyav(f, args.length, 1)):
            Image.fromarray(frame).save(folder / f"frame{t:04d}.jpg", quality=95)
    vae = write_tiny_vae(work / "tiny_vae")
    runs = {"frame folders (JPEG, baseline)": work / "frames", "video files (.avi, PyAV)": work / "UCF-101"}
    prepare_times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, src in runs.items():
            argv = ["videos", str(src), "--out", str(work / f"out-{r}-{len(prepare_times[name])}-{src.name}"),
                    "--vae", str(vae), "--resolution", str(args.resolution), "--frames", str(args.frames),
                    "--frame-stride", str(args.stride), "--labels", "folders", "--latents", "sample",
                    "--shard-size", "8", "--quiet"]  # fmt: skip
            prepare_times[name].append(timed(lambda a=argv: prepare_from_argv(a)))

    print(f"# {platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"threads), commit {commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"# {args.videos} videos, 320x240 MPEG-4 .avi, {args.length} frames; clip: {args.frames} frames at stride "
          f"{args.stride} ({need} decoded); median of {args.rounds} interleaved rounds")  # fmt: skip
    print("\n| decoder | videos/s (wall) | ms/video (wall) | ms/video (CPU) |\n|---|---|---|---|")
    for name, samples in decode_times.items():
        wall, cpu = median_pair(samples)
        print(f"| {name} | {args.videos / wall:.1f} | {1000 * wall / args.videos:.1f} | "
              f"{1000 * cpu / args.videos:.1f} |")  # fmt: skip
    if problem is not None:
        print(f"| torchcodec | does not run here: {problem} | | |")
    print(f"\n| prepare videos, resolution {args.resolution}, tiny VAE | videos/s (wall) | videos/s (CPU time) |"
          "\n|---|---|---|")  # fmt: skip
    for name, samples in prepare_times.items():
        wall, cpu = median_pair(samples)
        print(f"| {name} | {args.videos / wall:.2f} | {args.videos / cpu:.2f} |")


if __name__ == "__main__":
    main()
