"""Reference statistics: computed once per key, cached, recomputed on a key change; under two processes merged from
disjoint shares into the single-process statistics (the command that builds them:
``tests/zigma_lightning/test_reference_stats.py``)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from zigma.metrics.progress import progress_bar
from zigma.metrics.reference import (
    compute_stats,
    key_hash,
    load_reference,
    rank_share,
    reference_stats,
    share_size,
)


class CountingExtractor(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 6): per-channel mean and std, counting its calls (a stand-in for Inception)."""

    num_features = 6
    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.images = 0

    def forward(self, x):
        assert x.dtype == torch.uint8
        self.calls += 1
        self.images += x.shape[0]
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _batches(n: int, size: int = 8, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return [images[i : i + batch] for i in range(0, n, batch)]


KEY = {"dataset": "faces", "resolution": 8, "count": 10, "extractor": "counting", "antialias": False}


def test_second_call_loads_the_cache_without_extracting(tmp_path):
    extractor = CountingExtractor()
    first = reference_stats(_batches(12), extractor=extractor, key=KEY, cache_dir=tmp_path)
    assert first.count == 10 and extractor.images == 10  # the last batch is cut to reach exactly `count`
    assert (tmp_path / f"{key_hash(KEY)}.npz").is_file()

    def never():
        raise AssertionError("the image source must not be read on a cache hit")
        yield

    second = reference_stats(never(), extractor=extractor, key=dict(KEY), cache_dir=tmp_path)
    assert extractor.calls == 3
    assert second.meta["dataset"] == "faces" and second.count == 10
    torch.testing.assert_close(second.cov, first.cov)


@pytest.mark.parametrize("change", [{"dataset": "other"}, {"count": 8}, {"resolution": 16}, {"antialias": True}])
def test_a_key_change_recomputes(tmp_path, change):
    extractor = CountingExtractor()
    reference_stats(_batches(12), extractor=extractor, key=KEY, cache_dir=tmp_path)
    calls = extractor.calls
    key = {**KEY, **change}
    stats = reference_stats(_batches(12, seed=1), extractor=extractor, key=key, cache_dir=tmp_path)
    assert extractor.calls > calls
    assert stats.count == key["count"] and len(list(tmp_path.glob("*.npz"))) == 2


def test_too_few_images_and_incomplete_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"asked for 10 images.*only 8"):
        reference_stats(_batches(8), extractor=CountingExtractor(), key=KEY, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lacks \['antialias'\]"):
        key = {k: v for k, v in KEY.items() if k != "antialias"}
        reference_stats(_batches(12), extractor=CountingExtractor(), key=key, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.npz"))


def test_a_file_for_another_resolution_is_refused(tmp_path):
    stats = reference_stats(_batches(12), extractor=CountingExtractor(), key=KEY, cache_dir=tmp_path)
    path = stats.save(tmp_path / "faces_8.npz")
    assert load_reference(path, expect={"resolution": 8, "dataset": "faces"}).count == 10
    with pytest.raises(ValueError, match=r"resolution: file has 8, this run needs 256.*zigma reference-stats"):
        load_reference(path, expect={"resolution": 256, "dataset": "faces"})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_take_every_item_exactly_once(world):
    """Batches of uneven sizes, a stream longer than ``count``: the ranks' rows together are the first ``count``
    items, each once, and rank r holds items r, r + W, ... (``share_size`` of them)."""
    items = torch.arange(23)
    batches = [items[:4], items[4:5], items[5:12], items[12:]]
    shares = [torch.cat(list(rank_share(batches, 17, r, world))) for r in range(world)]
    for r, share in enumerate(shares):
        assert share.tolist() == list(range(r, 17, world)) and len(share) == share_size(17, r, world)
    assert sorted(torch.cat(shares).tolist()) == list(range(17))


def test_a_progress_bar_counts_the_images_on_rank_zero_only(tmp_path, capsys):
    """Asked for, the bar is drawn to stderr with the image count as its total; None (the default) draws only on a
    terminal (stderr is captured here, not a TTY), so batch-job logs get no bar lines."""
    compute_stats(_batches(12), extractor=CountingExtractor(), count=10, progress=True, desc="reals")
    drawn = capsys.readouterr().err
    assert "reals" in drawn and "0/10" in drawn
    reference_stats(_batches(12), extractor=CountingExtractor(), key=KEY, cache_dir=tmp_path)
    assert capsys.readouterr().err == ""
    bar = progress_bar(5, "x", enabled=True, rank=1)
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == ""


# --- two processes (gloo on CPU) ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    """Rank ``rank`` of 2: the real ``reference_stats`` under an initialised process group, several cases."""
    import torch.distributed as dist

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cache = Path(out) / "cache"
    result = {}
    try:
        stream = CountingExtractor()  # the whole stream to every rank: each keeps its rows
        result["stream"] = reference_stats(_batches(12, batch=3), extractor=stream, key=KEY, cache_dir=cache)
        result["stream_images"] = stream.images
        shares = CountingExtractor()  # a function of (rank, world size): each rank reads only its own images
        images = torch.cat(_batches(12))[:10]
        result["shares"] = reference_stats(lambda r, w: [images[r::w]], extractor=shares,
                                           key={**KEY, "dataset": "shares"}, cache_dir=cache)  # fmt: skip
        result["shares_images"] = shares.images
        hit = CountingExtractor()

        def never():
            raise AssertionError("the image source must not be read on a cache hit")
            yield

        result["hit"] = reference_stats(never(), extractor=hit, key=KEY, cache_dir=cache)
        result["hit_images"] = hit.images

        def broken(r, w):  # rank 1 meets an unreadable image
            if r == 1:
                raise OSError("image 1 is truncated")
            return [images[r::w]]

        for case, source in (("short", _batches(9)), ("broken", broken)):
            try:
                reference_stats(source, extractor=CountingExtractor(), key={**KEY, "dataset": case}, cache_dir=cache)
            except Exception as err:  # every rank must raise, none may wait for the other
                result[case] = f"{type(err).__name__}: {err}"
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def test_two_processes_merge_their_shares_into_the_single_process_statistics(tmp_path):
    """Each rank extracts half of the reals, the float64 sums are all-reduced: the same count, mean and covariance as
    one process, the file written once by rank 0; a cache hit reads nothing; a short source or one rank's error ends
    every rank (no hang)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = compute_stats(_batches(12), extractor=CountingExtractor(), count=10)
    for case in ("stream", "shares"):
        merged = ranks[0][case]
        assert ranks[1][case] is None  # rank 0 owns the reference
        assert merged.count == 10 and [r[f"{case}_images"] for r in ranks] == [5, 5]  # disjoint halves, none idle
        torch.testing.assert_close(merged.mean, single.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.cov, single.cov, rtol=1e-10, atol=1e-10)
    saved = load_reference(tmp_path / "cache" / f"{key_hash(KEY)}.npz", expect=KEY)
    torch.testing.assert_close(saved.cov, single.cov, rtol=1e-10, atol=1e-10)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and not list((tmp_path / "cache").glob(".*"))
    assert ranks[0]["hit"].count == 10 and ranks[1]["hit"] is None and [r["hit_images"] for r in ranks] == [0, 0]
    for r in ranks:
        assert r["short"] == "ValueError: reference statistics: asked for 10 images, the source gave only 9"
    assert ranks[0]["broken"] == "RuntimeError: reference statistics failed on another rank (its log has the error)"
    assert ranks[1]["broken"] == "OSError: image 1 is truncated"
