"""The embedded default data set: LFW face crops that ship inside scikit-image (no download).

``skimage.data.lfw_subset()`` holds 200 grayscale 25x25 crops; the first 100 are faces. They are resized to
``image_size`` (bilinear), mapped to [-1, 1] as (1, S, S) pixels (no VAE), and flipped horizontally at random.
There is no held-out split (100 images): validation measures the loss on the same faces with fixed
(noise, t) draws, which tracks optimisation progress, not generalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datamodules.base import ZigMaDataModule

NUM_FACES = 100


def load_lfw_faces(image_size: int = 32) -> torch.Tensor:
    """(100, 1, image_size, image_size) float32 faces in [-1, 1]."""
    from skimage.data import lfw_subset

    faces = torch.from_numpy(lfw_subset()[:NUM_FACES]).float().unsqueeze(1)  # (100, 1, 25, 25) in [0, 1]
    faces = F.interpolate(faces, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (faces.clamp(0, 1) * 2 - 1).contiguous()


class FaceDataset(Dataset):
    """``repeats`` passes over the faces per epoch, each item flipped with probability 1/2 if ``hflip``."""

    def __init__(self, faces: torch.Tensor, repeats: int = 1, hflip: bool = False):
        self.faces = faces
        self.repeats = repeats
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.faces) * self.repeats

    def __getitem__(self, index: int) -> dict:
        x = self.faces[index % len(self.faces)]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x}


class EmbeddedFacesDataModule(ZigMaDataModule):
    """Unconditional 1-channel faces; batches ``{"x": (B, 1, S, S)}``."""

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 32,
        val_batch_size: int = 50,
        repeats: int = 32,
        hflip: bool = True,
        num_workers: int = 0,
        num_predict_samples: int = 16,
        predict_batch_size: int = 16,
        predict_seed: int = 0,
    ):
        super().__init__(num_predict_samples, predict_batch_size, predict_seed)
        for name, value in {"image_size": image_size, "batch_size": batch_size, "val_batch_size": val_batch_size,
                            "repeats": repeats}.items():  # fmt: skip
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1; got {value}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.repeats = repeats
        self.hflip = hflip
        self.num_workers = num_workers
        self.sample_shape = (1, image_size, image_size)
        self.faces: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.faces is None:
            self.faces = load_lfw_faces(self.image_size)

    def train_dataloader(self) -> DataLoader:
        dataset = FaceDataset(self.faces, self.repeats, self.hflip)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(FaceDataset(self.faces), batch_size=self.val_batch_size, shuffle=False)
