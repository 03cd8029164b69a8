"""GaussianStats and frechet_distance against closed forms; the real torch-fidelity Inception with random weights."""

import itertools
import json

import numpy as np
import pytest
import torch

from zigma.metrics.frechet import GaussianStats, frechet_distance
from zigma.metrics.inception import INCEPTION_WEIGHTS_FILE, load_inception, to_uint8


def _stats(x: torch.Tensor, **meta) -> GaussianStats:
    return GaussianStats(x.shape[1], meta=meta).update(x)


def test_distance_to_itself_is_zero_and_grows_with_a_mean_shift():
    x = torch.randn(500, 8, dtype=torch.float64)
    assert abs(frechet_distance(_stats(x), _stats(x))) < 1e-9
    distances = [frechet_distance(_stats(x), _stats(x + shift)) for shift in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert all(b > a for a, b in itertools.pairwise(distances)), distances
    # A pure mean shift moves only ||μa - μb||² = d · shift².
    assert distances[-1] == pytest.approx(8 * 9.0, rel=1e-9)


def test_distance_equals_the_closed_form_for_diagonal_gaussians():
    # Exact moments: x = μ + σ ⊙ z with z of zero mean and identity covariance exactly (orthonormal columns).
    d, n = 6, 400
    z = torch.randn(n, d, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # zero mean, unbiased covariance I
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    s1, s2 = torch.rand(d, dtype=torch.float64) + 0.5, torch.rand(d, dtype=torch.float64) + 0.5
    a, b = _stats(mu1 + s1 * z), _stats(mu2 + s2 * z)
    torch.testing.assert_close(a.cov, torch.diag(s1**2))
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # Tr(Σ1 + Σ2 - 2 (Σ1Σ2)^½) = Σ (σ1 - σ2)²
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9, abs=1e-9)


def test_distance_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    a = _stats(torch.randn(200, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64))
    b = _stats(torch.randn(300, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64) + 1)
    s1, s2 = a.cov.numpy(), b.cov.numpy()
    expected = ((a.mean - b.mean) ** 2).sum().item() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_merge_equals_update_on_the_union():
    x, y = torch.randn(37, 4), torch.randn(11, 4) + 2
    union = _stats(torch.cat([x, y]))
    merged = _stats(x).merge(_stats(y))
    assert merged.count == union.count == 48
    torch.testing.assert_close(merged.mean, union.mean)
    torch.testing.assert_close(merged.cov, union.cov)
    torch.testing.assert_close(merged.cov, torch.from_numpy(np.cov(torch.cat([x, y]).double().numpy().T)))
    assert merged.sum.dtype == merged.outer.dtype == torch.float64


def test_save_load_round_trip_keeps_metadata_and_can_merge(tmp_path):
    x = torch.randn(50, 6)
    meta = {"dataset": "faces", "resolution": 256, "extractor": "inception-v3-compat", "antialias": False}
    stats = _stats(x, **meta)
    path = stats.save(tmp_path / "stats.npz")
    loaded = GaussianStats.load(path)
    assert loaded.count == 50 and loaded.meta == {**meta, "count": 50, "dim": 6}
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.cov, stats.cov)
    y = torch.randn(20, 6)
    torch.testing.assert_close(loaded.merge(_stats(y)).cov, _stats(torch.cat([x, y])).cov)
    with np.load(path) as data:  # readable without zigma: mu/sigma like pytorch-fid's files, plain-JSON metadata
        assert data["mu"].shape == (6,) and data["sigma"].shape == (6, 6)
        assert json.loads(str(data["meta"]))["dataset"] == "faces"


def test_errors_name_the_side_and_the_dimensions():
    two, one = _stats(torch.randn(2, 3)), _stats(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"second set \(b\).*at least 2 samples, got 1"):
        frechet_distance(two, one)
    with pytest.raises(ValueError, match=r"first set \(a\).*got 0"):
        frechet_distance(GaussianStats(3), two)
    with pytest.raises(ValueError, match="dimension mismatch"):
        frechet_distance(two, _stats(torch.randn(4, 5)))
    with pytest.raises(ValueError, match=r"expected features \(N, 3\)"):
        two.update(torch.randn(4, 5))


def test_all_reduce_over_a_single_process_group(tmp_path):
    import torch.distributed as dist

    x = torch.randn(10, 3)
    stats = _stats(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats.all_reduce()
    finally:
        dist.destroy_process_group()
    assert stats.count == 10
    torch.testing.assert_close(stats.cov, _stats(x).cov)


def test_to_uint8_rounds_with_127_5():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 1 / 127.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]  # 0 -> round(127.5) = 128 (half to even), 1 -> 255


# --- the real torch-fidelity Inception, random weights --------------------------------------------------------------


@pytest.fixture(scope="module")
def inception(random_inception_weights):
    return load_inception(random_inception_weights)


def _images(n: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(40, 200, (n, 3, 64, 64), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_inception_features_are_2048_d_and_deterministic(inception):
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    x = _images(2)
    f1, f2 = inception(x), inception(x)
    assert f1.shape == (2, 2048) and f1.dtype == torch.float32 and torch.isfinite(f1).all()
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    inception.train()
    assert not inception.training
    with pytest.raises(ValueError, match="uint8"):
        inception(x.float())


@pytest.fixture(scope="module")
def features(inception):
    """Features of 8 images and of the same 8 images brightened by 50 levels (one batch of 16 through Inception)."""
    real, shifted = _images(8), _images(8, shift=50)
    out = inception(torch.cat([real, shifted]))
    return out[:8], out[8:]


def _fid_checks(real: torch.Tensor, shifted: torch.Tensor) -> None:
    a, b = GaussianStats(real.shape[1]).update(real), GaussianStats(real.shape[1]).update(shifted)
    scale = float(a.cov.trace() + a.mean.square().sum())
    same = frechet_distance(a, GaussianStats(real.shape[1]).update(real.clone()))
    apart = frechet_distance(a, b)
    print(f"d={real.shape[1]}: FID(a, a) = {same:.3e}, FID(a, shifted) = {apart:.3e}, scale {scale:.3e}")
    assert abs(same) < 1e-6 * scale
    assert apart > 1e-3 * scale


def test_fid_through_inception_is_zero_on_itself_and_positive_on_a_shifted_set(features):
    # The first 256 of the 2048 features: a 2048-d distance takes ~10 s on 2 CPU cores (two eigh), see the slow test.
    real, shifted = features
    _fid_checks(real[:, :256], shifted[:, :256])


@pytest.mark.slow
def test_fid_through_inception_full_2048_features(features):
    _fid_checks(*features)


def test_antialias_resize_changes_features(random_inception_weights, inception):
    tf = inception
    aa = load_inception(random_inception_weights, antialias=True)
    assert aa.name != tf.name
    x = _images(2)
    f_tf, f_aa = tf(x), aa(x)
    assert (f_tf - f_aa).abs().max() > 1e-3 * f_tf.abs().max()  # random weights: features are tiny, compare relatively


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as info:
        load_inception(tmp_path / "nope.pth")
    assert "nope.pth" in str(info.value) and "internet" in str(info.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match=r"torch_home/hub/checkpoints") as info:
        load_inception()
    assert "https://github.com/toshas/torch-fidelity" in str(info.value)
