"""zigma.metrics.pixel_quality: each number against its closed form on small constructed sets."""

import math

import pytest
import torch

from zigma.metrics.pixel_quality import (
    PCAFeatures,
    coverage,
    frechet_distance,
    gradient_energy,
    nn_distance,
    patch_edge_ratio,
    pca_frechet,
    quality_report,
    real_floor,
    rms_distances,
)


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    var_a, var_b = (
        torch.rand(5, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(5, generator=g, dtype=torch.float64),
    )
    expected = float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    assert frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b)) == pytest.approx(expected, rel=1e-9)


def test_pca_frechet_is_zero_for_the_same_set_and_grows_with_a_shift():
    x = images(40)
    pca = PCAFeatures(x, k=6)
    assert pca_frechet(x, x, pca) == pytest.approx(0, abs=1e-8)
    # a constant shift c of every pixel moves the feature mean by c·Σ_d W_d: FD = |that|² (covariances unchanged)
    shift = float((0.3 * pca.basis.sum(0)).square().sum())
    assert pca_frechet(x + 0.3, x, pca) == pytest.approx(shift, rel=1e-6)


def test_pca_basis_is_orthonormal_and_centres_the_reals():
    x = images(30)
    pca = PCAFeatures(x, k=5)
    assert torch.allclose(pca.basis.T @ pca.basis, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert pca(x).mean(0).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"PCAFeatures: k must be in \[1, 29\] for 30 images; got 30"):
        PCAFeatures(x, k=30)


def test_nearest_neighbours_copies_mirrors_and_leave_one_out():
    train = images(6)
    assert torch.all(nn_distance(train, train) == 0)
    mirrored = train.flip(-1)
    assert torch.all(nn_distance(mirrored, train, mirror=True) < 1e-6)
    assert torch.all(nn_distance(mirrored, train) > 0.1)
    d = (train[0] - train[1]).square().mean().sqrt()
    assert float(rms_distances(train[:1], train[1:2])) == pytest.approx(float(d))
    loo = nn_distance(train, train, exclude_self=True)
    manual = torch.stack(
        [rms_distances(train[i : i + 1], torch.cat([train[:i], train[i + 1 :]])).min() for i in range(6)]
    )
    assert torch.allclose(loo, manual)


def test_coverage_counts_distinct_nearest_training_images():
    train = images(5)
    assert coverage(train, train) == 1.0
    assert coverage(train[2:3].repeat(7, 1, 1, 1) + 0.01, train) == pytest.approx(1 / 5)


def test_gradient_energy_and_patch_edge_ratio_on_constructed_images():
    assert gradient_energy(torch.zeros(2, 1, 8, 8)) == 0
    checker = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2.0 - 1  # ±1: every difference is 2
    assert gradient_energy(checker[None, None]) == pytest.approx(8.0)
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = 0.1 * (i + j)  # every adjacent difference 0.1
    assert patch_edge_ratio(ramp[None, None], 4) == pytest.approx(1.0)
    # plus a jump of 1 at the vertical patch border: across = (8·1.1 + 8·0.1) / 16 = 0.6, within = 0.1
    assert patch_edge_ratio((ramp + (j >= 4).float())[None, None], 4) == pytest.approx(6.0)
    with pytest.raises(ValueError, match=r"patch must be >= 2 and divide \(8, 8\); got 3"):
        patch_edge_ratio(ramp[None, None], 3)


def test_report_of_the_reals_matches_the_floor_where_it_should():
    train = images(20, seed=3)
    report, floor = quality_report(train, train, patch=4, k=4), real_floor(train, patch=4, k=4)
    assert report.nn_train == 0 and report.coverage == 1.0
    assert report.pca_fd == pytest.approx(floor.pca_fd)  # FD(R1, R2) and FD(R2, R1): the floor
    assert report.nn_self == pytest.approx(floor.nn_self) and report.gradient_energy == floor.gradient_energy
    assert floor.pca_fd > 0 and math.isfinite(floor.patch_edge_ratio)
