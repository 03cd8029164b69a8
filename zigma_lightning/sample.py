"""``zigma sample``: N samples from a checkpoint alone, in constant memory, resumable, on one or more devices.

    zigma sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --count 50000 --out samples/
    zigma sample --ckpt export/ --count 64 --labels 207,360 --guidance-scale 4 --out grid/ --png
    zigma sample --ckpt coco.pt --count 1000 --captions captions.npy --vae sd-vae-ft-ema/ --out coco/
    zigma sample --ckpt last.ckpt --count 50000 --out samples/ --accelerator gpu --devices 8   # DDP

The checkpoint is a Lightning ``.ckpt`` (its EMA weights), a ``zigma export`` directory or an upstream ``.pt``
(``zigma_lightning.sample_model``); shapes, transport, sampler and VAE default to what it records.

Exactness: sample i starts from the noise ``FlowMatchingModule.noise([i], seed)`` and gets condition i (class label
``class_labels(num_classes, count, seed)[i]`` as ``predict`` draws it, or the listed/cycled labels, or caption
``i % K``), so with the same seed it is the image ``predict`` makes. Samples are made in fixed batches ("shards")
[k·B, (k+1)·B) of B = ``--batch-size``; shard k is made by rank ``k % world_size`` and written as it is made
(``zigma.sample_store.SampleStore``). The SDE's Brownian increments are seeded per shard from (seed, k·B), so an SDE
sample depends on the seed, i and B. A rerun skips the shards on disk, so a killed run, resumed on any number of
devices, ends with the same bytes as an uninterrupted one; ``manifest.json`` refuses a rerun with other settings.
Errors in the inputs stop before any sampling with one line ``error: ...`` naming the option (exit status 2).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zigma.conditions import class_labels, load_caption_features
from zigma.metrics.progress import progress_bar
from zigma.sample_store import SampleStore, SampleStoreError, check_manifest, to_uint8_hwc
from zigma_lightning.extras import missing_extra_message

log = logging.getLogger(__name__)

MODES = ("ode", "sde")
DEFAULT_METHOD = {"ode": "euler", "sde": "Euler"}


class UsageError(ValueError):
    """Input that cannot work; one line naming the option."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zigma sample", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt, `zigma export` directory or upstream .pt")
    parser.add_argument("--out", required=True, help="output directory (resumed when it holds the same run)")
    parser.add_argument("--count", "--num", type=int, required=True, help="number of samples N")
    parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch and shard")
    parser.add_argument("--mode", choices=MODES, help="ode or sde (default: the checkpoint's)")
    parser.add_argument("--method", help="ODE: euler, heun, midpoint, rk4, dopri5; SDE: Euler, Heun")
    parser.add_argument("--steps", type=int, help="time points of the sampler grid (default: the checkpoint's)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    parser.add_argument("--labels", help="class models: random (as predict draws them; default), cycle (i %% classes) "
                        "or a comma-separated list of class ids, cycled")  # fmt: skip
    parser.add_argument("--captions", help="text models: caption features (K, N, d_context) .npy/.npz/.pt; "
                        "sample i uses caption i %% K")  # fmt: skip
    parser.add_argument("--prompts", help="text models: a text file, one caption per line, encoded with --clip")
    parser.add_argument("--clip", help="a local CLIP tokenizer + text model directory (needs the text extra)")
    parser.add_argument("--vae", help="VAE directory or cached hub id of a latent model (default: the checkpoint's)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="Lightning .ckpt: which weights")
    parser.add_argument("--png", action="store_true", help="also write one PNG per sample")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    parser.add_argument("--devices", type=int, default=1, help="devices per node (> 1: DDP, one process each)")
    parser.add_argument("--num-nodes", type=int, default=1)
    return parser


@dataclass(frozen=True)
class SamplePlan:
    """What to sample: N samples in shards of ``batch_size``, the sampler, and the conditions.

    labels: (N,) int64 class ids or None. captions: (K, N_tok, d) caption features or None (sample i: caption i % K).
    """

    count: int
    seed: int
    batch_size: int
    mode: str
    method: str
    steps: int
    guidance_scale: float
    labels: torch.Tensor | None = None
    captions: torch.Tensor | None = None

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.batch_size)

    def indices(self, shard: int) -> torch.Tensor:
        """Sample indices (n,) of shard ``shard``: [shard·B, min((shard + 1)·B, N))."""
        return torch.arange(shard * self.batch_size, min((shard + 1) * self.batch_size, self.count))

    def condition(self, indices: torch.Tensor) -> torch.Tensor | None:
        if self.labels is not None:
            return self.labels[indices]
        if self.captions is not None:
            return self.captions[indices % len(self.captions)]
        return None


def brownian_seed(seed: int, first: int) -> int:
    """The seed of the SDE's Brownian increments of the shard starting at sample ``first`` (independent of the noise
    seeds ``seed · 1_000_003 + i``)."""
    return int(np.random.SeedSequence([seed, first, 0x5DE]).generate_state(1, np.uint64)[0] >> 1)


def parse_labels(spec: str | None, num_classes: int, count: int, seed: int) -> torch.Tensor | None:
    """(count,) class ids from ``--labels``; None for a model without classes."""
    if num_classes <= 0:
        if spec is not None:
            raise UsageError(f"--labels {spec}: the model is not class-conditional")
        return None
    if spec is None or spec == "random":
        return class_labels(num_classes, count, seed)
    if spec == "cycle":
        return torch.arange(count) % num_classes
    try:
        ids = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UsageError(f"--labels {spec}: use random, cycle or comma-separated class ids") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise UsageError(f"--labels: class {bad[0]} is not one of the model's classes 0 .. {num_classes - 1}")
    return torch.tensor(ids)[torch.arange(count) % len(ids)]


def read_captions(args: argparse.Namespace, module) -> torch.Tensor | None:
    """Caption features (K, N, d) of a text model from ``--captions`` or ``--prompts`` + ``--clip``."""
    has_text, width = module.model.has_text, module.model.config["d_context"]
    given = "--captions" if args.captions else "--prompts" if args.prompts else None
    if not has_text:
        if given:
            raise UsageError(f"{given}: the model is not text-conditioned")
        return None
    if args.captions:
        try:
            return load_caption_features(args.captions, width)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--captions: {err}") from err
    if not args.prompts:
        raise UsageError(f"the model is text-conditioned: pass --captions FILE (features (K, N, {width})) or "
                         "--prompts FILE with --clip DIR")  # fmt: skip
    if not args.clip:
        raise UsageError("--prompts needs --clip DIR (a local CLIP tokenizer + text model directory)")
    prompts_file = Path(args.prompts)
    if not prompts_file.is_file():
        raise UsageError(f"--prompts: {prompts_file} not found")
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts: {prompts_file} holds no caption")
    from zigma.text_encoder import CLIPCaptionEncoder

    try:
        encoder = CLIPCaptionEncoder(args.clip)
    except ImportError as err:
        raise UsageError(f"--prompts: {missing_extra_message('transformers')}") from err
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(f"--clip {args.clip}: {str(err).splitlines()[0]}") from err
    if encoder.width != width:
        raise UsageError(f"--clip {args.clip}: features of width {encoder.width}, the model needs {width}")
    return torch.from_numpy(encoder.encode(prompts))


def resolve_sampler(args: argparse.Namespace, module) -> tuple[str, str, int, float]:
    """(mode, method, steps, guidance scale) from the options and the checkpoint's defaults, validated."""
    hp = module.hparams
    mode = args.mode or hp.sample_mode
    method = args.method or (hp.sample_method if mode == hp.sample_mode else DEFAULT_METHOD[mode])
    steps = args.steps if args.steps is not None else hp.sample_steps
    try:
        module._make_sampler(mode, method, steps)
    except ValueError as err:
        option = "--steps" if "num_steps" in str(err) else "--method"
        raise UsageError(f"{option}: {err}") from err
    scale = hp.guidance_scale if args.guidance_scale is None else args.guidance_scale
    if scale != 1.0 and not module.model.has_null_condition:
        raise UsageError(f"--guidance-scale {scale}: needs a conditional model trained with condition dropout; use 1")
    return mode, method, steps, scale


def check_vae(module, vae_option: str | None) -> None:
    """Load the VAE now (a missing one fails before sampling); a latent model without one is refused."""
    channels = module.model.in_channels
    if not module.hparams.vae:
        if channels not in (1, 3):
            raise UsageError(f"the model makes {channels}-channel latents: pass --vae DIR (the VAE that decodes them)")
        return
    try:
        _ = module.vae
    except (FileNotFoundError, OSError, ValueError) as err:
        option = "--vae" if vae_option else "the checkpoint's VAE (override with --vae)"
        raise UsageError(f"{option} {module.hparams.vae}: {str(err).splitlines()[0]}") from err


def prepare(args: argparse.Namespace) -> tuple[object, SamplePlan, dict]:
    """Load the module and check every input; returns (module, plan, manifest settings)."""
    # imported here, not at the top: it imports Lightning (seconds), which `zigma sample --help` does not need
    from zigma_lightning.sample_model import CheckpointError, load_sampling_module, weights_fingerprint

    for name in ("count", "batch_size", "devices", "num_nodes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    try:
        module = load_sampling_module(args.ckpt, weights=args.weights, vae=args.vae)
    except (CheckpointError, FileNotFoundError, KeyError) as err:
        raise UsageError(f"--ckpt: {str(err).strip(chr(39))}") from err
    mode, method, steps, scale = resolve_sampler(args, module)
    check_vae(module, args.vae)
    labels = parse_labels(args.labels, module.model.num_classes, args.count, args.seed)
    captions = read_captions(args, module)
    plan = SamplePlan(args.count, args.seed, args.batch_size, mode, method, steps, scale, labels, captions)
    settings = {
        "weights_sha256": weights_fingerprint(module.ema.network),
        "count": plan.count, "seed": plan.seed, "batch_size": plan.batch_size, "mode": mode, "method": method,
        "steps": steps, "guidance_scale": scale, "labels": args.labels or ("random" if labels is not None else None),
        "captions_sha256": None if captions is None else hashlib.sha256(captions.numpy().tobytes()).hexdigest(),
        "vae": module.hparams.vae, "sample_shape": list(module.sample_shape),
    }  # fmt: skip
    return module, plan, settings


@torch.no_grad()
def make_shard(module, plan: SamplePlan, shard: int) -> tuple[torch.Tensor, np.ndarray]:
    """(indices (n,), uint8 images (n, [T,] H, W, C)) of shard ``shard``."""
    indices = plan.indices(shard)
    y = plan.condition(indices)
    x0 = module.noise(indices, seed=plan.seed)
    if plan.mode == "sde":
        torch.manual_seed(brownian_seed(plan.seed, int(indices[0])))
    result = module.generate(x0, None if y is None else y.to(module.device), mode=plan.mode, method=plan.method,
                             num_steps=plan.steps, guidance_scale=plan.guidance_scale)  # fmt: skip
    pixels = module.decode(result.x).float()
    if not bool(torch.isfinite(pixels).all()):
        raise FloatingPointError(f"samples {int(indices[0])} .. {int(indices[-1])} are not finite: the sampler "
                                 "diverged; use more --steps or another --method")  # fmt: skip
    return indices, to_uint8_hwc(pixels)


def sample_shards(module, plan: SamplePlan, store: SampleStore, rank: int = 0, world_size: int = 1) -> int:
    """Make and write this rank's shards that are not on disk yet; returns how many it made."""
    todo = [k for k in range(rank, plan.num_shards, world_size) if not store.has_shard(k * plan.batch_size)]
    total = sum(len(plan.indices(k)) for k in todo)
    with progress_bar(total, "sampling", unit="sample", rank=rank, leave=True) as bar:
        for shard in todo:
            indices, images = make_shard(module, plan, shard)
            store.write(indices, images)
            bar.update(len(indices))
    return len(todo)


def finish(store: SampleStore, plan: SamplePlan) -> Path:
    """The grid of the first 64 and ``samples.npz`` (kept when already there: it is written only when complete)."""
    target = store.directory / "samples.npz"
    if not target.is_file():
        store.write_grid()
        store.assemble(plan.count)
    return target


def run(args: argparse.Namespace) -> Path:
    module, plan, settings = prepare(args)
    check_manifest(args.out, settings)
    from lightning.fabric import Fabric

    distributed = args.devices > 1 or args.num_nodes > 1
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                    strategy="ddp" if distributed else "auto")  # fmt: skip
    fabric.launch()  # DDP: starts the other ranks, each running this command again
    store = SampleStore(args.out, png=args.png)
    if fabric.global_rank == 0:
        store.remove_dead_temporaries()  # before any rank writes (a pid of another node means nothing here)
    fabric.barrier()
    module.to(fabric.device)
    made = sample_shards(module, plan, store, fabric.global_rank, fabric.world_size)
    log.info("rank %d made %d shards", fabric.global_rank, made)
    fabric.barrier()
    target = store.directory / "samples.npz"
    if fabric.global_rank == 0:
        target = finish(store, plan)
        print(f"{plan.count} samples in {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when ``samples.npz`` is written; bad input prints one line ``error: ...`` and gives 2."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, SampleStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
