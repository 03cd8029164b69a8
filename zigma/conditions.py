"""The seeded per-sample condition draw: the class label of generated sample i, fixed by (seed, count, i).

Predict requests (``datamodules.base``), the sample grids (``callbacks.samples``) and the FID/FVD fakes
(``callbacks.evaluation``) all label sample i with ``class_labels(num_classes, count, seed)[i]``, so a sample keeps
its label whatever the batch size, the world size or a resume. The values are those of
``torch.randint(num_classes, (count,), generator=torch.Generator().manual_seed(seed))`` on the CPU; changing the
draw changes every saved grid, predicted image and FID of earlier runs. Text models read their conditions from a
file of precomputed caption features (``load_caption_features``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def class_labels(num_classes: int, count: int, seed: int) -> Tensor:
    """Class ids (count,) int64 in [0, num_classes) of samples 0 .. count-1, drawn on the CPU from ``seed``."""
    return torch.randint(num_classes, (count,), generator=torch.Generator().manual_seed(seed))


CAPTION_SUFFIXES = (".npy", ".npz", ".pt")


def load_caption_features(path: str, width: int) -> Tensor:
    """Precomputed caption features (K, N, width) float32 from a ``.npy``, a ``.npz`` (``arr_0``, or its only array)
    or a ``.pt`` tensor; one caption (N, width) is taken as K = 1. Generated sample i uses caption ``i % K``.

    Raises:
        FileNotFoundError, ValueError: one line naming the file, what it holds and the expected shape.
    """
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (caption features (K, N, {width}) as .npy, .npz or .pt)")
    suffix = os.path.splitext(path)[1]
    if suffix == ".pt":
        features = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npy":
        features = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            key = "arr_0" if "arr_0" in names else names[0] if len(names) == 1 else None
            if key is None:
                raise ValueError(f"{path} holds arrays {names}: put the caption features in arr_0")
            features = torch.from_numpy(data[key])
    else:
        raise ValueError(f"{path}: caption features must be a {', '.join(CAPTION_SUFFIXES)} file")
    if not isinstance(features, Tensor) or not features.is_floating_point():
        what = features.dtype if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{path} holds {what}; expected float caption features (K, N, {width})")
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3 or features.shape[-1] != width or 0 in features.shape:
        raise ValueError(f"{path} holds shape {tuple(features.shape)}; expected caption features (K, N, {width})")
    return features.float()
