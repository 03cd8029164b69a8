"""The data tool's command line: ``python -m datamodules.prepare images|videos SRC --out DIR ...`` (``zigma prepare``);
see ``datamodules.prepare`` for what it writes."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from datamodules.prepare.driver import prepare
from datamodules.prepare.encoding import LatentMode, StoreDtype
from datamodules.prepare.writing import ImageFormat, Options
from datamodules.tars import is_url
from zigma.vae import DEFAULT_VAE

DESCRIPTION = (
    "Write webdataset shards of images (or videos: .avi/.mp4/.webm/.mkv files or frame folders) with their raw VAE "
    "latents, labels and caption features."
)
DEFAULT_LATENT_KEY: dict[str, str] = {"images": "latent.npy", "videos": "frame_feature256.npy"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="a folder, or a .csv/.tsv/.jsonl list file with a 'path' column")
    common.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    common.add_argument("--split", default="train", help="shard name prefix and manifest split")
    common.add_argument("--resolution", type=int, default=256, help="pixels: shorter side resized, centre cropped")
    common.add_argument("--shard-size", type=int, default=1000, help="inputs per shard")
    common.add_argument("--workers", type=int, default=1, help="worker processes, one shard each at a time")
    common.add_argument("--device", default="cpu", help="where each worker runs the VAE (cpu, cuda, cuda:1, ...)")
    common.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL directory or hub id")
    common.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a whole Stable Diffusion repo")
    common.add_argument("--vae-scale", type=float, default=None,
                        help="recorded latent scale (default: the VAE's config.scaling_factor)")  # fmt: skip
    common.add_argument("--vae-dtype", default="float32", help="the VAE's compute dtype")
    common.add_argument("--allow-download", action="store_true", help="let diffusers/transformers fetch hub models")
    common.add_argument("--latents", default="sample", choices=get_args(LatentMode))
    common.add_argument("--latent-key", default=None, help="latent suffix (default: latent.npy / frame_feature256.npy)")
    common.add_argument("--dtype", default="float32", choices=get_args(StoreDtype), help="stored latent dtype")
    common.add_argument("--image-format", default="jpg", choices=get_args(ImageFormat))
    common.add_argument("--no-images", action="store_true", help="store latents only (no jpg/png)")
    common.add_argument("--labels", default="none", help="none | folders | list | a class names file")
    common.add_argument("--captions", default=None, help="list file with path and caption_feature or caption columns")
    common.add_argument("--clip", default=None, help="CLIP text model directory or hub id: encode 'caption' texts")
    common.add_argument("--seed", type=int, default=0, help="seeds the posterior samples (per sample index)")
    common.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    common.add_argument("--max-bad", type=int, default=100, help="unreadable inputs skipped before an error")
    common.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("images", parents=[common], help="image folder or list -> image + latent shards")
    video_help = "video files (.avi .mp4 .webm .mkv) or frame folders -> (T, C, h, w) latent shards"
    videos = sub.add_parser("videos", parents=[common], help=video_help)
    videos.add_argument("--frames", type=int, default=16, help="frames per video (T)")
    videos.add_argument("--frame-stride", type=int, default=1, help="take every k-th frame from the first")
    videos.add_argument("--split-file", default=None,
                        help="UCF101 split list (trainlist01.txt, testlist01.txt): the videos it names")  # fmt: skip
    videos.add_argument("--class-index", default=None,
                        help="UCF101 classInd.txt: class = the video's folder, id = its id minus 1")  # fmt: skip
    return parser


def prepare_from_argv(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line (``sys.argv[1:]`` if None) and run :func:`prepare`; returns the manifest.

    Raises:
        ValueError, RuntimeError, FileNotFoundError: as :func:`prepare` (``main`` prints them in one line).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    vae_path = Path(args.vae).expanduser()
    vae_kwargs = None
    if args.latents != "none":
        vae_kwargs = dict(name_or_path=str(vae_path.resolve()) if vae_path.is_dir() else args.vae,
                          subfolder=args.vae_subfolder, local_files_only=not args.allow_download, scale=args.vae_scale,
                          sample=args.latents in ("sample", "both-flips"), dtype=args.vae_dtype,
                          chunk_size=args.batch_size, device=args.device)  # fmt: skip
    clip_kwargs = None
    if args.clip is not None:
        clip_path = Path(args.clip).expanduser()
        clip_kwargs = dict(name_or_path=str(clip_path.resolve()) if clip_path.is_dir() else args.clip,
                           local_files_only=not args.allow_download, batch_size=args.batch_size,
                           device=args.device)  # fmt: skip
    options = Options(
        kind=args.kind,
        out=args.out if is_url(args.out) else str(Path(args.out).expanduser().resolve()),  # a URL is refused
        split=args.split,
        resolution=args.resolution,
        shard_size=args.shard_size,
        latents=args.latents,
        latent_key=args.latent_key or DEFAULT_LATENT_KEY[args.kind],
        dtype=args.dtype,
        image_format=None if args.no_images or args.kind == "videos" else args.image_format,
        frames=getattr(args, "frames", 16),
        frame_stride=getattr(args, "frame_stride", 1),
        seed=args.seed,
        batch_size=args.batch_size,
        max_bad=args.max_bad,
    )
    command = shlex.join(["python", "-m", "datamodules.prepare", *argv])
    return prepare(args.src, options, vae_kwargs=vae_kwargs, labels=args.labels, captions=args.captions,
                   clip_kwargs=clip_kwargs, split_file=getattr(args, "split_file", None),
                   class_index=getattr(args, "class_index", None), workers=args.workers, command=command,
                   progress=False if args.quiet else None)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when the shards and manifest are written; a bad setting or input prints one line
    ``error: ...`` to stderr and gives 1 (argparse's usage errors exit with 2)."""
    try:
        prepare_from_argv(argv)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build_parser", "main", "prepare_from_argv"]
