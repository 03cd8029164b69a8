"""Gaussian feature statistics (FID, FVD reference files).

:class:`GaussianStats` keeps what torchmetrics' ``FrechetInceptionDistance`` keeps (reference ecosystem §2.1): a float64
feature sum (d), a float64 outer-product sum (d, d) and a count, so memory does not grow with the number of samples.
The Fréchet distance itself is torchmetrics' (``callbacks.evaluation`` loads these sums into its real side).
Because the statistics are sums, disjoint shares of a set merge exactly (:meth:`GaussianStats.all_reduce` over
``torch.distributed`` ranks sums them): the result is that of one pass over the whole set,
up to float64 rounding. Reference statistics under DDP are computed that way (``zigma.metrics.reference``).

Files are ``.npz`` with ``mu`` (d), ``sigma`` (d, d, unbiased), ``count`` and ``meta`` (a JSON object: dataset,
resolution, count, extractor, antialias), so ``mu``/``sigma`` read like the reference files of pytorch-fid and ADM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from zigma.files import atomic_write


class GaussianStats:
    """Running float64 sums of d-dimensional features: ``update`` adds a batch.

    Args:
        dim: feature dimension d (2048 for Inception pool features).
        device: where the sums live.
        meta: plain-JSON metadata saved with the statistics (dataset, resolution, extractor, antialias, ...).
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None, meta: dict[str, Any] | None = None):
        if dim < 1:
            raise ValueError(f"GaussianStats: dim must be positive, got {dim}")
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (d,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (d, d), sum of x xᵀ
        self.count = 0
        self.meta: dict[str, Any] = dict(meta or {})

    def __repr__(self) -> str:
        return f"GaussianStats(dim={self.dim}, count={self.count}, meta={self.meta})"

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def to(self, device: torch.device | str) -> GaussianStats:
        """Moves the sums in place; returns self."""
        self.sum, self.outer = self.sum.to(device), self.outer.to(device)
        return self

    def update(self, features: Tensor) -> GaussianStats:
        """Adds a batch of features (N, d) (any float dtype; accumulated in float64); returns self."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"GaussianStats.update: expected features (N, {self.dim}), got {tuple(features.shape)}")
        x = features.detach().to(device=self.device, dtype=torch.float64)  # (N, d)
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        self.count += x.shape[0]
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> GaussianStats:
        """Replaces the sums and count by their sums over the ranks of ``group`` (every rank must call it; each then
        holds the merged statistics); returns self. Without an initialised process group it does nothing.

        One float64 all-reduce of [Σx (d), Σxxᵀ (d·d), n]: n is exact up to 2^53. NCCL reduces on this rank's
        current CUDA device, other backends on the CPU; the sums then return to :attr:`device`.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = collective_device(group)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        packed = torch.cat([self.sum.to(device), self.outer.to(device).flatten(), count])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        d = self.dim
        self.sum = packed[:d].to(self.device)
        self.outer = packed[d : d + d * d].view(d, d).to(self.device)
        self.count = int(packed[-1].item())
        return self

    def _need_two(self, side: str = "stats") -> None:
        if self.count < 2:
            raise ValueError(f"{side}: a covariance needs at least 2 samples, got {self.count}")

    @property
    def mean(self) -> Tensor:
        """μ = Σx / n, float64 (d,)."""
        if self.count < 1:
            raise ValueError("GaussianStats.mean: no samples")
        return self.sum / self.count

    @property
    def cov(self) -> Tensor:
        """Unbiased Σ = (Σ x xᵀ - n μ μᵀ) / (n - 1), float64 (d, d)."""
        self._need_two("GaussianStats.cov")
        mu = self.mean
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)

    def save(self, path: str | Path) -> Path:
        """Writes ``mu``, ``sigma``, ``count`` and ``meta`` (JSON, with ``count`` filled in) to an ``.npz``."""
        self._need_two(f"GaussianStats.save({path})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "count": self.count, "dim": self.dim}
        with atomic_write(path) as f:  # an open file keeps np.savez from appending ".npz" to other suffixes
            np.savez(
                f,
                mu=self.mean.cpu().numpy(),
                sigma=self.cov.cpu().numpy(),
                count=np.int64(self.count),
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str | None = None) -> GaussianStats:
        """Reads :meth:`save`'s file; the sums (Σx, Σxxᵀ) are rebuilt from μ, Σ and n."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GaussianStats.load: no statistics file at {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "count"} - set(data.files)
            if missing:
                raise ValueError(f"GaussianStats.load: {path} lacks {sorted(missing)} (has {sorted(data.files)})")
            mu = torch.from_numpy(data["mu"].astype(np.float64))
            sigma = torch.from_numpy(data["sigma"].astype(np.float64))
            count = int(data["count"])
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        stats = cls(mu.shape[0], meta=meta)
        stats.count = count
        stats.sum = count * mu
        stats.outer = (count - 1) * sigma + count * torch.outer(mu, mu)
        return stats.to(device) if device is not None else stats


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors of a ``torch.distributed`` collective must live: this rank's CUDA device under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
