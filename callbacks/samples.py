"""Sample logging: EMA sample grids (and, for video models, GIF clips) in TensorBoard during training, and PNG files
for ``predict``."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from PIL import Image
from torchvision.utils import make_grid

from zigma.conditions import class_labels
from zigma.sample_store import SAMPLES_NAME, SampleStore, to_uint8_hwc

log = logging.getLogger(__name__)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model-space pixels in [-1, 1] -> [0, 1] (clamped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def image_grid(samples: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (3 or 1, H', W') grid in [0, 1]; video (B, T, C, H, W) shows frames in rows."""
    if samples.dim() == 5:
        return make_grid(to_unit_range(samples.flatten(0, 1)), nrow=samples.shape[1], padding=1)
    nrow = nrow or max(1, round(samples.shape[0] ** 0.5))
    return make_grid(to_unit_range(samples), nrow=nrow, padding=1)


GIF_CHANNELS = (1, 3)  # grayscale ("L") and RGB clips; other channel counts (undecoded latents) have no GIF mode


def video_grid(videos: torch.Tensor) -> torch.Tensor:
    """Tile B clips into one clip, laid out as TensorBoard's ``add_video`` lays them out.

    Same layout and uint8 conversion as ``torch.utils.tensorboard.summary._prepare_video`` and ``video``: the batch is
    padded with black clips to the next power of two, then tiled row by row into 2**((B.bit_length() - 1) // 2) rows;
    [0, 1] is scaled by 255 and truncated.

    Args:
        videos: (B, T, C, H, W) pixels in [-1, 1].

    Returns:
        (T, rows * H, cols * W, C) uint8 frames; clip b sits at row b // cols, column b % cols.
    """
    b, t, c, h, w = videos.shape
    frames = (to_unit_range(videos) * 255).to(torch.uint8)  # truncates, as add_video's astype(np.uint8)
    padded = 1 << (b - 1).bit_length()  # the next power of two >= B
    frames = torch.cat([frames, frames.new_zeros(padded - b, t, c, h, w)])  # (padded, T, C, H, W)
    rows = 2 ** ((b.bit_length() - 1) // 2)
    cols = padded // rows
    frames = frames.reshape(rows, cols, t, c, h, w).permute(2, 0, 4, 1, 5, 3)  # (T, rows, H, cols, W, C)
    return frames.reshape(t, rows * h, cols * w, c)


def encode_gif(frames: torch.Tensor, fps: int) -> bytes:
    """Encode frames as a looping animated GIF with Pillow.

    Grayscale frames are stored exactly (a gray palette); RGB frames are quantised to a 256-colour palette per frame.
    Pillow merges a frame identical to the one before it into that frame (longer duration), so such a clip plays the
    same but holds fewer than T frames.

    Args:
        frames: (T, H, W, C) uint8, C = 1 or 3.
        fps: frames per second (frame duration 1000 / fps ms, rounded; GIF stores hundredths of a second).

    Returns:
        The GIF file's bytes.

    Raises:
        ValueError: C is not 1 or 3.
    """
    channels = frames.shape[-1]
    if frames.dim() != 4 or channels not in GIF_CHANNELS:
        raise ValueError(f"encode_gif: frames must be (T, H, W, C) with C in {GIF_CHANNELS}; got {tuple(frames.shape)}")
    arrays = frames.cpu().numpy()
    images = [Image.fromarray(a[..., 0] if channels == 1 else a) for a in arrays]  # mode "L" or "RGB"
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def add_video_clips(experiment, tag: str, videos: torch.Tensor, step: int, fps: int = 4) -> None:
    """Add B clips to TensorBoard as one video (an animated GIF), the summary ``SummaryWriter.add_video`` writes.

    ``add_video`` is not used because it needs moviepy (and its ffmpeg dependencies), which we do not install, and
    torch imports ``moviepy.editor``, which moviepy 2 removed; without it, add_video prints a message and logs no video.
    Here the clips are tiled as add_video tiles them (``video_grid``), encoded with Pillow (``encode_gif``), and written
    as the same ``Summary.Image`` (height, width, colorspace = C, GIF bytes) that TensorBoard shows as a video.

    Args:
        experiment: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).
        tag: the TensorBoard tag, e.g. ``samples/ema_video``.
        videos: (B, T, C, H, W) pixels in [-1, 1], C = 1 or 3.
        step: the global step to record.
        fps: frames per second of the GIF.

    Raises:
        ValueError: C is not 1 or 3.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames = video_grid(videos.detach().cpu())  # (T, H', W', C) uint8
    _, height, width, channels = frames.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encode_gif(frames, fps))
    experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def check_finite(x: torch.Tensor, what: str, step: int) -> None:
    """Raise FloatingPointError naming ``what``, the step and how many values of ``x`` are NaN or Inf, if any are."""
    nonfinite = int((~torch.isfinite(x)).sum())
    if nonfinite:
        raise FloatingPointError(
            f"{what} at global step {step}: {nonfinite} of {x.numel()} values are NaN or Inf. The EMA weights or the "
            "sampler diverged (upstream ZigMa would have logged noise instead); check train/loss and "
            "train/nonfinite_skipped, and lower model.lr or use more sampling steps"
        )


class SampleGridLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), sample ``num_samples`` images with the
    EMA weights from the same fixed noise and labels (text models: the captions of the first training batches, kept
    in checkpoints), and add the grid to TensorBoard as ``samples/ema``. Video models
    also get the clips as a TensorBoard video, ``samples/ema_video`` (``add_video_clips``), when their decoded frames
    have 1 or 3 channels.

    Sampling must succeed: an exception from ``generate`` propagates, and non-finite samples raise FloatingPointError
    (upstream ZigMa replaced a failed sample with ``torch.rand_like`` noise, which hid the failure).

    Args:
        every_n_steps: optimizer steps between two logs.
        num_samples: samples (clips) per log.
        seed: seed of the fixed noise and labels.
        method, num_steps: the sampler (None: the module's defaults).
        fps: frames per second of the video.
        class_rows: class-conditional models: one grid row per class (sample i gets class i // per-row, with
            ``num_samples`` a multiple of the number of classes) instead of the seeded labels.
        guidance_scale: classifier-free guidance scale of the grid (None: the module's ``guidance_scale``).
    """

    def __init__(self, every_n_steps: int = 500, num_samples: int = 16, seed: int = 0, method: str | None = None,
                 num_steps: int | None = None, fps: int = 4, class_rows: bool = False,
                 guidance_scale: float | None = None):  # fmt: skip
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("SampleGridLogger: every_n_steps and num_samples must be >= 1")
        if fps < 1:
            raise ValueError(f"SampleGridLogger: fps must be >= 1; got {fps}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.method = method
        self.num_steps = num_steps
        self.fps = fps
        self.class_rows = class_rows
        self.guidance_scale = guidance_scale
        self._last_logged = -1
        self._warned_channels = False
        self._captions: torch.Tensor | None = None  # (K, N, d_context) fixed captions of a text model

    def _labels(self, pl_module) -> torch.Tensor | None:
        """Fixed conditions: class labels drawn from ``seed``, or the captions kept from the first training
        batches (cycled if fewer than ``num_samples``), or None."""
        classes = pl_module.model.num_classes
        if classes > 0 and self.class_rows:
            if self.num_samples % classes:
                raise ValueError(f"SampleGridLogger: class_rows needs num_samples to be a multiple of the {classes} "
                                 f"classes; got {self.num_samples}")  # fmt: skip
            return torch.arange(classes, device=pl_module.device).repeat_interleave(self.num_samples // classes)
        if classes > 0:
            return class_labels(pl_module.model.num_classes, self.num_samples, self.seed).to(pl_module.device)
        if pl_module.model.has_text:
            return self._captions[torch.arange(self.num_samples) % len(self._captions)].to(pl_module.device)
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Text models: keep the captions of the first training batches (up to ``num_samples``) as the fixed
        captions of every grid; they are saved in checkpoints, so a resumed run keeps them."""
        if not pl_module.model.has_text or batch.get("y") is None:
            return
        kept = 0 if self._captions is None else len(self._captions)
        if kept < self.num_samples:
            new = batch["y"][: self.num_samples - kept].detach().cpu()
            self._captions = new if self._captions is None else torch.cat([self._captions, new])

    def state_dict(self) -> dict[str, Any]:
        return {"captions": self._captions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._captions = state_dict.get("captions")

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_logged or trainer.logger is None:
            return
        if pl_module.model.has_text and self._captions is None:
            return  # no training batch with captions seen yet
        noise = pl_module.noise(torch.arange(self.num_samples), seed=self.seed)
        result = pl_module.generate(noise, self._labels(pl_module), method=self.method, num_steps=self.num_steps,
                                    guidance_scale=self.guidance_scale)  # fmt: skip
        check_finite(result.x, "SampleGridLogger: the EMA samples", step)
        pixels = pl_module.decode(result.x).cpu()  # (B, C, H, W) or (B, T, C, H, W) in [-1, 1]
        check_finite(pixels, "SampleGridLogger: the decoded EMA samples", step)
        experiment = trainer.logger.experiment
        if hasattr(experiment, "add_image"):
            rows = self.class_rows and pl_module.model.num_classes > 0
            nrow = self.num_samples // pl_module.model.num_classes if rows else None
            experiment.add_image("samples/ema", image_grid(pixels, nrow), global_step=step)
        if pl_module.model.video_frames > 0 and hasattr(experiment, "_get_file_writer"):
            self._log_video(experiment, pixels, step)
        self._last_logged = step

    def _log_video(self, experiment, clips: torch.Tensor, step: int) -> None:
        if clips.shape[2] in GIF_CHANNELS:
            add_video_clips(experiment, "samples/ema_video", clips, step, self.fps)
        elif not self._warned_channels:  # once per run, at the first log
            rank_zero_warn(
                f"SampleGridLogger: decoded clips have {clips.shape[2]} channels and a GIF needs 1 or 3, so only the "
                "frames grid samples/ema is logged (set model.vae to decode latents to pixels)"
            )
            self._warned_channels = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_grid(trainer, pl_module)


class SampleWriter(BasePredictionWriter):
    """Writes each predicted batch as it is made (``zigma.sample_store.SampleStore`` in ``output_dir``): one PNG per
    sample, ``<index:06d>.png`` (video: ``<index:06d>_<frame:03d>.png``), and a uint8 shard ``shards/<first>.npz``.
    At the end (under DDP: rank 0, once every rank is done) ``grid.png`` of the samples 0 .. 63 and, with
    ``save_npz``, ``samples.npz``: ``arr_0`` uint8 (N, H, W, C) of every sample in index order, the format external
    FID evaluators read, assembled from the shards without holding them in memory. Memory does not grow with N.
    A new predict run replaces the shards of an earlier one in the same directory."""

    def __init__(self, output_dir: str = "samples", grid: bool = True, save_npz: bool = False, png: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.grid = grid
        self.save_npz = save_npz
        self.png = png
        self._store: SampleStore | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._store = SampleStore(self.output_dir, png=self.png)
        if trainer.is_global_zero:
            self._store.clear()
            (self.output_dir / SAMPLES_NAME).unlink(missing_ok=True)
        trainer.strategy.barrier("SampleWriter.on_predict_start")

    def write_on_batch_end(
        self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self._store.write(prediction["index"], to_uint8_hwc(prediction["samples"]))

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("SampleWriter.on_predict_end")
        if not trainer.is_global_zero:
            return
        if self.grid:
            self._store.write_grid()
        if self.save_npz:
            self._store.assemble()
        log.info("wrote the samples to %s", self.output_dir)
