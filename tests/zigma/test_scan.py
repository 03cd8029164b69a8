"""Scan orders: permutations, continuity, upstream's tables, layer assignment, parsing errors."""

import numpy as np
import pytest
import torch

from zigma import ZigMa
from zigma.scan import (
    LayerMode,
    LayerScan,
    ScanFamily,
    ScanSpec,
    _hilbert_rank_grid,
    hilbert_paths,
    inverse_permutation,
    random_paths,
    zigzag_paths,
)

GRID_SIDES = [2, 4, 8, 16, 32]

# reference table (zigma-upstream.md §3.2), N = 4
UPSTREAM_ZIGZAG_N4 = [
    [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],
    [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8, 12, 13, 14, 15],
    [3, 7, 11, 15, 14, 10, 6, 2, 1, 5, 9, 13, 12, 8, 4, 0],
    [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
    [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
    [15, 14, 13, 12, 8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3],
    [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12],
]


def is_permutation(path, n_tokens):
    return sorted(np.asarray(path).tolist()) == list(range(n_tokens))


def is_continuous(path, n):
    """Consecutive visited cells are 4-neighbours on the n x n grid."""
    rows, cols = np.divmod(np.asarray(path), n)
    return bool(np.all(np.abs(np.diff(rows)) + np.abs(np.diff(cols)) == 1))


def test_zigzag_paths_match_upstream_table():
    assert [p.tolist() for p in zigzag_paths(4)] == UPSTREAM_ZIGZAG_N4


@pytest.mark.parametrize("n", GRID_SIDES)
def test_zigzag_paths_are_continuous_permutations(n):
    paths = zigzag_paths(n)
    assert len(paths) == 8
    for p in paths:
        assert is_permutation(p, n * n)
        assert is_continuous(p, n)


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_zigzag_paths_are_four_curves_in_two_directions(n):
    paths = zigzag_paths(n)
    for a, b in [(0, 4), (1, 3), (2, 6), (5, 7)]:
        assert paths[a][::-1].tolist() == paths[b].tolist()


@pytest.mark.parametrize("n", GRID_SIDES)
def test_hilbert_paths_are_continuous_permutations(n):
    for p in hilbert_paths(n):
        assert is_permutation(p, n * n)
        assert is_continuous(p, n)
    assert len({tuple(p) for p in hilbert_paths(n)}) == (8 if n > 1 else 1)


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_hilbert_rank_map_used_as_gather_is_the_upstream_bug(n):
    """Upstream gathered with the rank map itself: none of its 8 orders is continuous; ours all are."""
    rank = _hilbert_rank_grid(n)
    variants = []
    for k in range(4):
        variants += [np.rot90(rank, k), np.rot90(rank, k).T]
    assert not any(is_continuous(v.reshape(-1), n) for v in variants)


def test_hilbert_rejects_non_power_of_two_grid():
    with pytest.raises(ValueError, match="power-of-two"):
        hilbert_paths(12)


def test_random_paths_depend_only_on_seed():
    a, b, c = random_paths(64, 3, seed=5), random_paths(64, 3, seed=5), random_paths(64, 3, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(is_permutation(p, 64) for p in a)


def test_inverse_permutation_round_trips():
    p = torch.randperm(50)
    inv = inverse_permutation(p)
    assert torch.equal(p[inv], torch.arange(50)) and torch.equal(inv[p], torch.arange(50))
    assert torch.equal(inv, torch.from_numpy(np.argsort(p.numpy())))


@pytest.mark.parametrize(
    ("name", "family", "k"),
    [
        ("zigzagN8", ScanFamily.ZIGZAG, 8),
        ("zigzag2", ScanFamily.ZIGZAG, 2),
        ("v2", ScanFamily.SWEEP2, 1),
        ("sweep2", ScanFamily.SWEEP2, 1),
        ("v1", ScanFamily.SWEEP1, 1),
        ("hilbertN4", ScanFamily.HILBERT, 4),
        ("randomN3", ScanFamily.RANDOM, 3),
        ("zzvideo_sst", ScanFamily.VIDEO, 8),
        ("video_st", ScanFamily.VIDEO, 8),
    ],
)
def test_scan_spec_parses_upstream_spellings_and_aliases(name, family, k):
    spec = ScanSpec.parse(name)
    assert spec.family is family and spec.num_paths == k
    assert ScanSpec.parse(spec.canonical_name()) == spec


@pytest.mark.parametrize("bad", ["zigzagN9", "zigzagN0", "spiral", "parallelN8", "video_ss", "zzvideo_sxt", "", 3])
def test_scan_spec_rejects_unknown_names_listing_valid_forms(bad):
    with pytest.raises(ValueError, match=r"valid forms|must be a string") as err:
        ScanSpec.parse(bad)
    assert "zigzagN" in str(err.value)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_layer_i_uses_path_i_mod_k(k):
    spec = ScanSpec.parse(f"zigzagN{k}")
    plans = spec.layer_plans(depth=24, grid_side=8)
    base = zigzag_paths(8)
    for i, plan in enumerate(plans):
        assert plan.mode is LayerMode.FLAT
        assert plan.path.tolist() == base[i % k].tolist()


def test_video_sst_plan_spatial_and_temporal_layers():
    plans = ScanSpec.parse("zzvideo_sst").layer_plans(depth=24, grid_side=4, video_frames=5)
    modes = "".join("s" if p.mode is LayerMode.SPATIAL else "t" for p in plans)
    assert modes == "sst" * 8
    spatial = [p for p in plans if p.mode is LayerMode.SPATIAL]
    temporal = [p for p in plans if p.mode is LayerMode.TEMPORAL]
    assert len(spatial) == 16 and len(temporal) == 8
    base = zigzag_paths(4)
    for j, p in enumerate(spatial):
        assert p.path.tolist() == base[j % 8].tolist() and is_continuous(p.path, 4)
    for j, p in enumerate(temporal):
        expected = list(range(5)) if j % 2 == 0 else list(range(4, -1, -1))
        assert p.path.tolist() == expected


def _token_sequences(scan: LayerScan, b, t, l, d=1):
    """The token ids each mixer sequence reads, obtained by running LayerScan with a recording mixer."""
    seen = []

    def mixer(seq):
        seen.append(seq[..., 0].clone())
        return seq

    ids = torch.arange(t * l, dtype=torch.float32).view(1, t * l, 1).expand(b, t * l, d)
    out = scan(mixer, ids)
    assert torch.equal(out, ids)  # P⁻¹ ∘ id ∘ P = id
    return seen[0].long()


def test_video_layers_are_continuous_within_frames_and_over_time():
    n, frames = 4, 3
    plans = ScanSpec.parse("zzvideo_st").layer_plans(depth=4, grid_side=n, video_frames=frames)
    spatial = _token_sequences(LayerScan(plans[0], frames), b=2, t=frames, l=n * n)
    assert spatial.shape == (2 * frames, n * n)
    for row in spatial:  # every sequence stays inside one frame and moves between 4-neighbours
        assert len(set((row // (n * n)).tolist())) == 1
        assert is_continuous(row % (n * n), n)
    temporal = _token_sequences(LayerScan(plans[1], frames), b=2, t=frames, l=n * n)
    assert temporal.shape == (2 * n * n, frames)
    for row in temporal:  # one location, consecutive frames
        assert len(set((row % (n * n)).tolist())) == 1
        assert (row // (n * n)).tolist() == list(range(frames))


def test_permutations_are_non_persistent_buffers_that_follow_to():
    model = ZigMa(in_channels=3, embed_dim=16, depth=2, img_dim=4, scan_type="zigzagN8", drop_path_rate=0.0)
    assert not any("path" in key or "inverse" in key for key in model.state_dict())
    model = model.to(torch.float64)
    assert model.blocks[0].scan.path.dtype == torch.int64


def test_random_scan_paths_are_seeded_and_stored_in_state_dict():
    kwargs = {"in_channels": 3, "embed_dim": 16, "depth": 3, "img_dim": 4, "scan_type": "randomN2"}
    a, b = ZigMa(**kwargs, scan_seed=1), ZigMa(**kwargs, scan_seed=1)
    assert torch.equal(a.random_scan_paths, b.random_scan_paths)
    assert "random_scan_paths" in a.state_dict()
    assert a.blocks[2].scan.path.tolist() == a.random_scan_paths[0].tolist()
    c = ZigMa(**kwargs, scan_seed=2)
    assert not torch.equal(a.random_scan_paths, c.random_scan_paths)


def test_loading_random_paths_rebuilds_every_layer_permutation():
    kwargs = {
        "in_channels": 3,
        "embed_dim": 16,
        "depth": 3,
        "img_dim": 4,
        "scan_type": "randomN2",
        "drop_path_rate": 0.0,
    }
    source, target = ZigMa(**kwargs, scan_seed=1), ZigMa(**kwargs, scan_seed=2)
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.blocks, target.blocks):
        assert torch.equal(a.scan.path, b.scan.path) and torch.equal(a.scan.inverse, b.scan.inverse)
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    torch.testing.assert_close(source.eval()(x, t), target.eval()(x, t))
