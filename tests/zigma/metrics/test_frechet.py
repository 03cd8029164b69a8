"""GaussianStats against closed forms; the real torch-fidelity Inception with random weights."""

import json

import numpy as np
import pytest
import torch

from zigma.metrics.frechet import GaussianStats
from zigma.metrics.inception import INCEPTION_WEIGHTS_FILE, load_inception, to_uint8


def _stats(x: torch.Tensor, **meta) -> GaussianStats:
    return GaussianStats(x.shape[1], meta=meta).update(x)


def test_mean_and_cov_equal_numpys_in_float64():
    x = torch.randn(48, 4)
    stats = _stats(x)
    torch.testing.assert_close(stats.mean, x.double().mean(0))
    torch.testing.assert_close(stats.cov, torch.from_numpy(np.cov(x.double().numpy().T)))
    assert stats.sum.dtype == stats.outer.dtype == torch.float64


def test_save_load_round_trip_keeps_metadata_and_the_sums(tmp_path):
    x = torch.randn(50, 6)
    meta = {"dataset": "faces", "resolution": 256, "extractor": "inception-v3-compat", "antialias": False}
    stats = _stats(x, **meta)
    path = stats.save(tmp_path / "stats.npz")
    loaded = GaussianStats.load(path)
    assert loaded.count == 50 and loaded.meta == {**meta, "count": 50, "dim": 6}
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.cov, stats.cov)
    torch.testing.assert_close(loaded.sum, stats.sum)  # the sums are what the FID metric's real side is given
    torch.testing.assert_close(loaded.outer, stats.outer)
    with np.load(path) as data:  # readable without zigma: mu/sigma like pytorch-fid's files, plain-JSON metadata
        assert data["mu"].shape == (6,) and data["sigma"].shape == (6, 6)
        assert json.loads(str(data["meta"]))["dataset"] == "faces"


def test_all_reduce_without_a_process_group_keeps_the_statistics():
    stats = _stats(torch.randn(6, 3))
    before = (stats.sum.clone(), stats.outer.clone(), stats.count)
    assert stats.all_reduce() is stats
    torch.testing.assert_close((stats.sum, stats.outer, stats.count), before, rtol=0, atol=0)


def test_update_error_names_the_dimensions():
    two = _stats(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"expected features \(N, 3\)"):
        two.update(torch.randn(4, 5))


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
