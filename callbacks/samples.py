"""Sample logging: EMA sample grids in TensorBoard during training, and PNG files for ``predict``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

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


class SampleGridLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), sample ``num_samples`` images with the
    EMA weights from the same fixed noise and labels, and add the grid to TensorBoard as ``samples/ema``."""

    def __init__(self, every_n_steps: int = 500, num_samples: int = 16, seed: int = 0, method: str | None = None,
                 num_steps: int | None = None):  # fmt: skip
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("SampleGridLogger: every_n_steps and num_samples must be >= 1")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.method = method
        self.num_steps = num_steps
        self._last_logged = -1

    def _labels(self, pl_module) -> torch.Tensor | None:
        if pl_module.model.num_classes > 0:
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randint(pl_module.model.num_classes, (self.num_samples,), generator=gen).to(pl_module.device)
        return None

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_logged or trainer.logger is None or pl_module.model.has_text:
            return  # text models need captions from the data; handled by the evaluation callbacks
        noise = pl_module.noise(torch.arange(self.num_samples), seed=self.seed)
        result = pl_module.generate(noise, self._labels(pl_module), method=self.method, num_steps=self.num_steps)
        experiment = trainer.logger.experiment
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/ema", image_grid(pl_module.decode(result.x).cpu()), global_step=step)
        self._last_logged = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_grid(trainer, pl_module)


class SampleWriter(BasePredictionWriter):
    """Writes each predicted sample as ``<output_dir>/<index:06d>.png`` and, at the end, ``grid.png`` (and with
    ``save_npz`` a ``samples.npz`` of uint8 HWC images, the format external FID evaluators read)."""

    def __init__(self, output_dir: str = "samples", grid: bool = True, save_npz: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.grid = grid
        self.save_npz = save_npz
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._kept = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        samples = prediction["samples"]
        for index, sample in zip(prediction["index"].tolist(), samples):
            frames = sample if sample.dim() == 4 else sample.unsqueeze(0)
            for t, frame in enumerate(frames):
                suffix = f"_{t:03d}" if sample.dim() == 4 else ""
                save_image(to_unit_range(frame), self.output_dir / f"{index:06d}{suffix}.png")
        self._kept.append((prediction["index"], samples))

    def on_predict_end(self, trainer, pl_module) -> None:
        if not self._kept:
            return
        indices = torch.cat([i for i, _ in self._kept])
        samples = torch.cat([s for _, s in self._kept])[indices.argsort()]
        if self.grid:
            save_image(image_grid(samples), self.output_dir / f"grid_rank{trainer.global_rank}.png"
                       if trainer.world_size > 1 else self.output_dir / "grid.png")  # fmt: skip
        if self.save_npz:
            import numpy as np

            images = (to_unit_range(samples) * 255).round().to(torch.uint8)
            images = images.movedim(-3, -1).numpy()  # (..., H, W, C)
            np.savez(self.output_dir / "samples.npz", arr_0=images)
        log.info("wrote %d samples to %s", len(samples), self.output_dir)
