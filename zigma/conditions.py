"""The seeded per-sample condition draw: the class label of generated sample i, fixed by (seed, count, i).

Predict requests (``datamodules.base``), the sample grids (``callbacks.samples``) and the FID/FVD fakes
(``callbacks.evaluation``) all label sample i with ``class_labels(num_classes, count, seed)[i]``, so a sample keeps
its label whatever the batch size, the world size or a resume. The values are those of
``torch.randint(num_classes, (count,), generator=torch.Generator().manual_seed(seed))`` on the CPU; changing the
draw changes every saved grid, predicted image and FID of earlier runs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_labels(num_classes: int, count: int, seed: int) -> Tensor:
    """Class ids (count,) int64 in [0, num_classes) of samples 0 .. count-1, drawn on the CPU from ``seed``."""
    return torch.randint(num_classes, (count,), generator=torch.Generator().manual_seed(seed))
