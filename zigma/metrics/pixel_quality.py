"""Download-free quality numbers for small grayscale image sets (the quickstart faces, the digits).

Inception features need a download and mean little at 32×32 grayscale; these numbers use only the pixels and the
real set itself. Every number comes with its value for real images (the *floor*: what a perfect generator would
score), so a table reads "samples vs reals".

Images are (N, C, H, W) in [-1, 1], flattened to vectors x ∈ R^D (D = C·H·W).

- **PCA Fréchet distance** (``pca_frechet``): the real set R fixes a PCA basis W (D, k) (its top k principal
  directions, centred at the real mean m); features are f(x) = (x - m) W. With Gaussian fits (μ_a, Σ_a) and
  (μ_b, Σ_b) of two feature sets, FD = |μ_a - μ_b|² + tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½), the formula of FID with PCA
  features in place of Inception's. It measures whether the samples have the real set's average face and its main
  modes of variation (pose, lighting, face shape) in the right proportions; blur lowers the variance along the
  directions and raises FD. Like FID it is biased upwards for small sets, so only sets of the same sizes compare:
  ``half_split_frechet`` compares half of the samples with one half of the reals and the other half with the other
  (FD = ½ [FD(S₁, R₂) + FD(S₂, R₁)], halves of h = min(N, M) // 2 images), and the floor is FD(R₁, R₂), the two
  halves of the reals: the same set sizes, so the same bias.
- **Nearest-neighbour distance to the training set** (``nn_distance``): per sample, the RMS pixel distance
  d(x, y) = (|x - y|² / D)^½ to the closest training image (in [-1, 1] units). Far above the real floor: noise or
  off-manifold samples; far below it: copies of training images (memorisation). The floor is the leave-one-out
  value for the reals (each real image's distance to the closest *other* real image).
- **Variety** (``nn_distance`` of a set to itself, leave-one-out; ``coverage``): collapsed samples are close to
  each other; ``coverage`` is the fraction of training images that are the nearest neighbour of at least one
  sample (a generator that repeats a few faces covers few).
- **Sharpness** (``gradient_energy``): mean squared difference of horizontally and vertically adjacent pixels,
  E = mean((x[..., i, j+1] - x[..., i, j])²) + mean((x[..., i+1, j] - x[..., i, j])²). Blur lowers it, noise raises
  it; the reals' value is the target.
- **Patch-grid artifacts** (``patch_edge_ratio``): the mean absolute difference of adjacent pixels across the
  borders of the model's p×p patches divided by the same inside the patches. A model that paints patches
  independently leaves a visible grid (ratio > 1); real images have ≈ 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def flatten(images: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, D) float64."""
    return images.detach().reshape(images.shape[0], -1).to(torch.float64)


def gaussian_fit(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (k,) and unbiased covariance (k, k) of features (N, k), N >= 2."""
    if features.shape[0] < 2:
        raise ValueError(f"gaussian_fit: a covariance needs at least 2 samples, got {features.shape[0]}")
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor) -> float:
    """|μ_a - μ_b|² + tr(Σ_a) + tr(Σ_b) - 2 tr((Σ_a Σ_b)^½).

    tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a Σ_b, which are real and >= 0 for
    covariance matrices (Σ_a Σ_b is similar to Σ_a^½ Σ_b Σ_a^½); tiny negative or imaginary parts from rounding are
    dropped.
    """
    eigenvalues = torch.linalg.eigvals(sigma_a @ sigma_b).real.clamp(min=0)
    distance = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * eigenvalues.sqrt().sum()
    return float(distance.clamp(min=0))


class PCAFeatures:
    """The top ``k`` principal directions of a real set: ``features(x)`` = (x - m) W, (N, k).

    Args:
        reals: (N, C, H, W) images that define the basis (N > k).
        k: number of directions.
    """

    def __init__(self, reals: Tensor, k: int = 16):
        x = flatten(reals)
        if not 1 <= k < x.shape[0]:
            raise ValueError(f"PCAFeatures: k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} images; got {k}")
        self.mean = x.mean(0)  # (D,)
        _, _, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vh[:k].T  # (D, k), orthonormal columns

    def __call__(self, images: Tensor) -> Tensor:
        return (flatten(images) - self.mean) @ self.basis


def pca_frechet(a: Tensor, b: Tensor, pca: PCAFeatures) -> float:
    """Fréchet distance between the Gaussian fits of two image sets' PCA features (see the module docstring)."""
    return frechet_distance(*gaussian_fit(pca(a)), *gaussian_fit(pca(b)))


def half_split_frechet(samples: Tensor, reals: Tensor, pca: PCAFeatures) -> float:
    """½ [FD(S₁, R₂) + FD(S₂, R₁)] over the first and second halves (h = min(N, M) // 2 images each) of both sets;
    the reals themselves as ``samples`` give the floor FD(R₁, R₂) (FD is symmetric; see the module docstring)."""
    h = min(samples.shape[0], reals.shape[0]) // 2
    s1, s2, r1, r2 = samples[:h], samples[h : 2 * h], reals[:h], reals[h : 2 * h]
    return (pca_frechet(s1, r2, pca) + pca_frechet(s2, r1, pca)) / 2


def rms_distances(a: Tensor, b: Tensor, mirror: bool = False) -> Tensor:
    """(N_a, N_b) RMS pixel distances (|x - y|² / D)^½ between every image of ``a`` and of ``b``.

    ``mirror``: the distance to b_j is the smaller of those to b_j and to b_j flipped left-right (training data
    augmented with horizontal flips holds both).
    """
    x = flatten(a)
    d = torch.cdist(x, flatten(b))
    if mirror:
        d = torch.minimum(d, torch.cdist(x, flatten(b.flip(-1))))
    return d.div(x.shape[1] ** 0.5)


def nn_distance(samples: Tensor, train: Tensor, exclude_self: bool = False, mirror: bool = False) -> Tensor:
    """(N,) RMS distance of each sample to its closest image of ``train`` (``mirror``: see :func:`rms_distances`).

    ``exclude_self``: ``samples`` is ``train`` itself (same order) and each image's own distance (0) is skipped:
    the leave-one-out floor.
    """
    d = rms_distances(samples, train, mirror)
    if exclude_self:
        if d.shape[0] != d.shape[1]:
            raise ValueError("nn_distance(exclude_self=True) needs samples and train to be the same set")
        d.fill_diagonal_(float("inf"))
    return d.min(1).values


def coverage(samples: Tensor, train: Tensor, mirror: bool = False) -> float:
    """Fraction of ``train`` images that are the nearest neighbour of at least one sample."""
    nearest = rms_distances(samples, train, mirror).argmin(1)
    return nearest.unique().numel() / train.shape[0]


def gradient_energy(images: Tensor) -> float:
    """mean((Δ_x)²) + mean((Δ_y)²) of adjacent-pixel differences (sharpness; see the module docstring)."""
    x = images.detach().to(torch.float64)
    return float(x.diff(dim=-1).square().mean() + x.diff(dim=-2).square().mean())


def patch_edge_ratio(images: Tensor, patch: int) -> float:
    """Mean |adjacent-pixel difference| across p×p patch borders / the same within patches (both directions).

    Horizontal differences x[..., j+1] - x[..., j] cross a border when (j + 1) % p == 0; likewise vertically.
    """
    if patch < 2 or images.shape[-1] % patch or images.shape[-2] % patch:
        raise ValueError(f"patch_edge_ratio: patch must be >= 2 and divide {tuple(images.shape[-2:])}; got {patch}")
    x = images.detach().to(torch.float64)
    dx, dy = x.diff(dim=-1).abs(), x.diff(dim=-2).abs()  # (..., H, W-1), (..., H-1, W)
    border_x = (torch.arange(1, x.shape[-1]) % patch) == 0  # (W-1,) True where j+1 starts a new patch
    border_y = (torch.arange(1, x.shape[-2]) % patch) == 0
    across = torch.cat([dx[..., border_x].flatten(), dy[..., border_y, :].flatten()]).mean()
    within = torch.cat([dx[..., ~border_x].flatten(), dy[..., ~border_y, :].flatten()]).mean()
    return float(across / within)


@dataclass(frozen=True)
class QualityReport:
    """The numbers of one image set against the training set (see the module docstring for each)."""

    count: int
    pca_fd: float
    nn_train: float
    nn_self: float
    coverage: float
    gradient_energy: float
    patch_edge_ratio: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def quality_report(samples: Tensor, train: Tensor, patch: int, k: int = 16, mirror: bool = False) -> QualityReport:
    """``samples`` (N, C, H, W) against the training images ``train`` (M, C, H, W), both in [-1, 1];
    ``mirror``: nearest neighbours count flipped training images too (:func:`rms_distances`).

    The PCA basis comes from ``train``; ``nn_train`` is the mean nearest-neighbour distance to ``train`` and
    ``nn_self`` the mean leave-one-out nearest-neighbour distance within ``samples``. For the real floor pass the
    reals as ``samples`` via :func:`real_floor`.
    """
    pca = PCAFeatures(train, k)
    return QualityReport(
        count=samples.shape[0],
        pca_fd=half_split_frechet(samples, train, pca),
        nn_train=float(nn_distance(samples, train, mirror=mirror).mean()),
        nn_self=float(nn_distance(samples, samples, exclude_self=True, mirror=mirror).mean()),
        coverage=coverage(samples, train, mirror),
        gradient_energy=gradient_energy(samples),
        patch_edge_ratio=patch_edge_ratio(samples, patch),
    )


def real_floor(train: Tensor, patch: int, k: int = 16, mirror: bool = False) -> QualityReport:
    """What real images score: FD between the two halves of ``train`` (:func:`half_split_frechet`), nearest
    neighbours leave-one-out, coverage of the reals by themselves leave-one-out (each real's closest other real)."""
    pca = PCAFeatures(train, k)
    nearest_other = rms_distances(train, train, mirror).fill_diagonal_(float("inf")).argmin(1)
    loo = float(nn_distance(train, train, exclude_self=True, mirror=mirror).mean())
    return QualityReport(
        count=train.shape[0],
        pca_fd=half_split_frechet(train, train, pca),
        nn_train=loo,
        nn_self=loo,
        coverage=nearest_other.unique().numel() / train.shape[0],
        gradient_energy=gradient_energy(train),
        patch_edge_ratio=patch_edge_ratio(train, patch),
    )
