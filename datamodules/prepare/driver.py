"""The data tool's driver: :func:`prepare` lists the inputs, checks the output directory's manifest, writes the
missing shards (in worker processes when asked) and records every shard in the manifest."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

from datamodules.manifest import (
    MANIFEST_NAME,
    diff_settings,
    prepared_settings,
    read_manifest,
    settings_of,
    write_manifest,
)
from datamodules.prepare.encoding import LatentMode, StoreDtype
from datamodules.prepare.inputs import Inputs, Kind, list_inputs
from datamodules.prepare.writing import (
    Options,
    ShardResult,
    ShardTask,
    init_worker,
    read_done_shard,
    remove_stale_temps,
    run_task,
    worker_context,
    write_shard,
)
from datamodules.tars import is_url
from zigma.text_encoder import CLIPCaptionEncoder
from zigma.vae import FrozenVAE

log = logging.getLogger("zigma.data.prepare")

MAX_BAD_PATHS = 100  # bad inputs listed in the manifest (all are counted)


def prepare(
    src: str | os.PathLike,
    options: Options,
    *,
    vae_kwargs: dict[str, Any] | None,
    labels: str = "none",
    captions: str | None = None,
    clip_kwargs: dict[str, Any] | None = None,
    split_file: str | None = None,
    class_index: str | None = None,
    workers: int = 1,
    command: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """List the inputs, write the missing shards (in ``workers`` processes when > 1) and the manifest.

    Args:
        src, labels, captions, split_file, class_index: as :func:`list_inputs`.
        options: what to write where.
        vae_kwargs: ``FrozenVAE`` arguments (the VAE is loaded once here and once per worker); None with
            ``latents="none"``.
        clip_kwargs: ``CLIPCaptionEncoder`` arguments to encode ``caption`` texts (loaded once here and once per
            worker, which encodes the captions of its shard); None: captions only as feature files.
        workers: worker processes, one shard per task (0 or 1: write in this process).
        command: recorded in the manifest (default: this process's command line).
        progress: show a tqdm bar (None: only on a terminal).

    Returns: the manifest written to ``options.out``.
    Raises:
        ValueError: a bad setting, or an output directory prepared with other settings or inputs.
        RuntimeError: more than ``max_bad`` unreadable inputs.
    """
    from tqdm.auto import tqdm

    opts = options
    _check_options(opts, vae_kwargs, workers)
    vae = FrozenVAE(**vae_kwargs) if vae_kwargs is not None else None
    if vae is not None and opts.resolution % vae.downsample_factor:
        raise ValueError(
            f"--resolution {opts.resolution} is not divisible by the VAE's downsample factor {vae.downsample_factor}"
        )
    inputs = list_inputs(src, opts.kind, labels=labels, captions=captions, caption_text=clip_kwargs is not None,
                         split_file=split_file, class_index=class_index)  # fmt: skip
    clip = CLIPCaptionEncoder(**clip_kwargs) if clip_kwargs is not None else None
    if clip is not None:
        counts = {len(it.captions or ()) for it in inputs.items}
        inputs.caption_feature_shape = [counts.pop() if len(counts) == 1 else None, *clip.shape]
    settings = prepared_settings(opts, inputs, vae, clip)
    caption_tail = tuple(inputs.caption_feature_shape[1:]) if inputs.caption_feature_shape else None
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, settings, opts, inputs, command)
    recorded = {entry["name"]: entry for entry in manifest["splits"][opts.split]["shards"]}
    remove_stale_temps(out, opts.split)

    tasks = [ShardTask(s, tuple(inputs.items[i : i + opts.shard_size]), opts)
             for s, i in enumerate(range(0, len(inputs.items), opts.shard_size))]  # fmt: skip
    results: dict[str, ShardResult] = {}
    todo = []
    for task in tasks:
        done = read_done_shard(task, recorded.get(task.name)) if (out / task.name).is_file() else None
        if done is not None:
            results[task.name] = done
        else:
            todo.append(task)
    skipped = len(tasks) - len(todo)
    log.info("%s: %d inputs in %d shards; %d already written, %d to write", opts.split, len(inputs.items),
             len(tasks), skipped, len(todo))  # fmt: skip
    bad_before = sum(len(r.bad) for r in results.values())
    _check_budget(bad_before, opts.max_bad, next((r.bad[-1] for r in results.values() if r.bad), None))

    unit = "image" if opts.kind == "images" else "video"
    bar = tqdm(total=sum(len(t.items) for t in todo), unit=unit, desc=f"{opts.split} shards",
               disable=None if progress is None else not progress)  # fmt: skip
    total_bad = bad_before

    def collect(result: ShardResult) -> None:
        nonlocal total_bad
        results[result.name] = result
        for rel, error in result.bad:
            log.warning("skipped unreadable input %s: %s", rel, error)
        total_bad += len(result.bad)
        bar.update(result.count + len(result.bad))
        _check_budget(total_bad, opts.max_bad, result.bad[-1] if result.bad else None)

    try:
        if workers <= 1:
            for task in todo:
                collect(write_shard(task, vae, caption_tail, clip))
        elif todo:
            threads = max(1, (os.cpu_count() or 1) // workers)
            context = worker_context(captions=clip_kwargs is not None, vae=vae_kwargs is not None)
            init_args = (vae_kwargs, caption_tail, threads, clip_kwargs)
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=init_worker, initargs=init_args
            )
            with pool:
                futures = [pool.submit(run_task, task) for task in todo]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        collect(future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()

    ordered = [results[t.name] for t in tasks]
    bad_paths = [rel for r in ordered for rel, _ in r.bad]
    manifest["splits"][opts.split].update(
        complete=True,
        count=sum(r.count for r in ordered),
        bad=len(bad_paths),
        bad_paths=bad_paths[:MAX_BAD_PATHS],
        shards=[{"name": r.name, "count": r.count, "bad": len(r.bad)} for r in ordered],
    )
    write_manifest(out, manifest)
    count = manifest["splits"][opts.split]["count"]
    log.info("%s: wrote %d shards (%d skipped), %d samples, %d unreadable inputs skipped; %s", opts.split,
             len(todo), skipped, count, len(bad_paths), out / MANIFEST_NAME)  # fmt: skip
    return manifest


def _check_budget(bad: int, max_bad: int, last: tuple[str, str] | None) -> None:
    if bad > max_bad:
        detail = f" (last: {last[0]}: {last[1]})" if last else ""
        raise RuntimeError(
            f"{bad} unreadable inputs, more than --max-bad {max_bad}{detail}; the shards written so far are kept: "
            "fix or remove the inputs (or raise --max-bad) and rerun to resume"
        )


def _check_options(opts: Options, vae_kwargs: dict[str, Any] | None, workers: int) -> None:
    """Raise ValueError for a bad setting, before any input is read."""
    if opts.kind not in get_args(Kind):
        raise ValueError(f"kind={opts.kind!r}: must be one of {list(get_args(Kind))}")
    if opts.latents not in get_args(LatentMode):
        raise ValueError(f"--latents {opts.latents!r}: must be one of {list(get_args(LatentMode))}")
    if opts.dtype not in get_args(StoreDtype):
        raise ValueError(f"--dtype {opts.dtype!r}: must be one of {list(get_args(StoreDtype))}")
    if is_url(str(opts.out)):  # the shards are written (atomically) and checked on resume in a local directory
        raise ValueError(f"--out {opts.out}: must be a local directory; upload it afterwards (e.g. aws s3 sync OUT "
                         "s3://bucket/dir/) and train on the URLs")  # fmt: skip
    if not re.fullmatch(r"[A-Za-z0-9_]+", opts.split):
        raise ValueError(f"--split {opts.split!r}: use letters, digits and '_' (it starts every shard name)")
    for name, value, low in (("resolution", opts.resolution, 1), ("shard-size", opts.shard_size, 1),
                             ("frames", opts.frames, 1), ("frame-stride", opts.frame_stride, 1),
                             ("batch-size", opts.batch_size, 1), ("max-bad", opts.max_bad, 0),
                             ("workers", workers, 0), ("seed", opts.seed, 0)):  # fmt: skip
        if value < low:
            raise ValueError(f"--{name} must be >= {low}; got {value}")
    if not opts.latent_key.endswith(".npy") or "/" in opts.latent_key:
        raise ValueError(f"--latent-key {opts.latent_key!r}: must be a file suffix ending in .npy")
    if (opts.latents == "none") != (vae_kwargs is None):
        raise ValueError(f"--latents {opts.latents}: a VAE is needed exactly when latents are written")
    if opts.kind == "videos" and opts.latents in ("both-flips", "none"):
        raise ValueError(f"--latents {opts.latents} is for images; videos store sample, mean or moments")
    if opts.latents == "none" and opts.image_format is None:
        raise ValueError("--latents none with --no-images would write empty samples")


def _start_manifest(out: Path, settings: dict[str, Any], opts: Options, inputs: Inputs,
                    command: str | None) -> dict[str, Any]:  # fmt: skip
    """The manifest with this split marked incomplete, written before any shard; refuses a directory whose manifest
    has other settings, or this split with other inputs or shard size.

    The split's ``shards`` keep what earlier runs recorded (name and sample count of each shard they wrote), so that
    this run, and a rerun after it is interrupted, can check the shards on disk against them; a completed run
    replaces them. Readers use the counts of complete splits only (``datamodules.shards.manifest_counts``).
    """
    fingerprint = inputs.fingerprint()
    earlier: list[dict[str, Any]] = []
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        old = settings_of(manifest)
        # the keys' shapes follow from the other settings: name those first
        diffs = diff_settings(
            {k: v for k, v in old.items() if k != "keys"}, {k: v for k, v in settings.items() if k != "keys"}
        )
        diffs = diffs or diff_settings(old["keys"], settings["keys"], "keys.")
        if diffs:
            raise ValueError(
                f"--out {out} holds shards prepared with other settings (manifest != this run: "
                f"{'; '.join(diffs)}); use another --out, or delete the directory to start again"
            )
        previous = manifest["splits"].get(opts.split)
        if previous is not None and (previous["inputs"] != fingerprint or previous["shard_size"] != opts.shard_size):
            raise ValueError(
                f"--out {out}: split {opts.split!r} was prepared from other inputs or another --shard-size "
                f"({previous['inputs']['count']} inputs, shard size {previous['shard_size']}; now "
                f"{fingerprint['count']}, {opts.shard_size}); the sample -> shard assignment would change. Use "
                f"another --split or --out, or delete {opts.split}-*.tar"
            )
        earlier = previous["shards"] if previous is not None else []
    else:
        strays = sorted(out.glob(f"{opts.split}-*.tar"))
        if strays:
            raise ValueError(
                f"--out {out} holds {strays[0].name} ... but no {MANIFEST_NAME}: they were not written by this tool; "
                "use an empty --out"
            )
        manifest = {**settings, "splits": {}}
    manifest["splits"][opts.split] = {
        "complete": False,
        "count": 0,
        "bad": 0,
        "bad_paths": [],
        "shard_size": opts.shard_size,
        "shards": earlier,
        "inputs": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
    }
    write_manifest(out, manifest)
    return manifest


__all__ = ["prepare"]
