"""Shards named by URLs (issue 16): ``http://`` shards served by a local HTTP server on 127.0.0.1 and ``pipe:cat``
commands read the same samples and batches as the local files (same order, same rank/worker split), sample counts
come from the manifest next to the URLs (nothing else is fetched), a mid-epoch resume continues exactly, damage is
charged to the bad-sample budget as for files, and a shard that cannot be read at all is one line naming it."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from datamodules.errors import BadSampleBudgetExceeded, DataError
from datamodules.images import shard_images
from datamodules.manifest import manifest_location, read_manifest, write_manifest
from datamodules.shards import BadSampleBudget, complete_shard_keys, expand_shards, read_shards
from datamodules.tars import ShardUnreachable, shard_file_name, spec_parts
from datamodules.webdataset import WebDataModule
from zigma_lightning.cli import root_cause

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// URLs with curl")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # requests are recorded in ``server.requested`` instead
        self.server.requested.append(self.path)


@pytest.fixture
def serve():
    """``serve(directory)`` -> (base URL, list of requested paths) of an HTTP server on 127.0.0.1 for ``directory``."""
    servers = []

    def start(directory: Path) -> tuple[str, list[str]]:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.requested = []
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.requested

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def attach(dm, rank=0, world_size=1):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what rank_and_world reads
    return dm


def batches(loader) -> list[list[int]]:
    """One epoch's batches as sample indices (latent_scale=1: each latent is filled with its sample index)."""
    return [batch["x"].flatten(1)[:, 0].round().long().tolist() for batch in loader]


def write_counts_manifest(directory: Path, counts: dict[str, int]) -> None:
    """A minimal valid manifest recording ``counts`` ({shard file name: samples}) as a complete split."""
    write_manifest(directory, {
        "format": "zigma-shards", "version": 1, "kind": "images", "resolution": 8, "keys": {}, "latents": "sample",
        "latent_shape": [4, 4, 4], "vae": None, "num_classes": 0, "label_names": [], "caption_feature_shape": None,
        "splits": {"train": {"complete": True, "count": sum(counts.values()), "bad": 0, "bad_paths": [],
                             "shard_size": 8, "shards": [{"name": n, "count": c} for n, c in counts.items()],
                             "inputs": {}, "created": "", "command": ""}}})  # fmt: skip


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- names
def test_url_specs_expand_braces_without_listing_and_find_their_manifest(tmp_path):
    command = "pipe:aws s3 cp s3://b/d/train-{000000..000002}.tar -"
    assert spec_parts(command) == [command]  # a command's spaces belong to it
    assert spec_parts(f"{command}::pipe:cat v.tar") == [command, "pipe:cat v.tar"]  # webdataset's separator
    assert spec_parts("a-{x,y}.tar, b.tar") == ["a-{x,y}.tar", "b.tar"]  # commas inside braces belong to the pattern
    assert expand_shards(command) == [f"pipe:aws s3 cp s3://b/d/train-00000{i}.tar -" for i in range(3)]
    urls = ["https://h/d/t-{1..2}.tar", "https://h/d/t-0.tar"]
    assert expand_shards(urls) == [f"https://h/d/t-{i}.tar" for i in range(3)]  # sorted; nothing fetched or checked
    with pytest.raises(ValueError, match=r"unknown URL scheme 's3:'.*pipe:aws s3 cp s3://bucket/key\.tar -"):
        expand_shards("s3://b/train-0.tar")
    assert manifest_location("pipe:aws s3 cp s3://b/d/train-000001.tar -") == "pipe:aws s3 cp s3://b/d/manifest.json -"
    assert manifest_location("pipe:gsutil cat gs://b/train-000001.tar") == "pipe:gsutil cat gs://b/manifest.json"
    assert manifest_location("https://h/d/train-000001.tar?sig=x") == "https://h/d/manifest.json"
    assert manifest_location(str(tmp_path / "train-0.tar")) == str(tmp_path / "manifest.json")
    assert manifest_location("pipe:my-loader 17") is None and shard_file_name("pipe:cat 'x/y.tar'") == "y.tar"


# ---------------------------------------------------------------------------------------------------------- reading
def test_http_and_pipe_shards_give_the_local_batches_with_counts_from_the_manifest(make_shards, serve, tmp_path):
    local = make_shards([8, 8, 8, 5])  # rank 0 holds shards 0 and 2 (16 samples), rank 1 shards 1 and 3 (13)
    directory = Path(local[0]).parent
    write_counts_manifest(directory, {Path(p).name: c for p, c in zip(local, [8, 8, 8, 5])})
    base, requested = serve(directory)
    specs = {"local": local, "http": f"{base}/train-{{000000..000003}}.tar",
             "pipe": f"pipe:cat {directory}/train-{{000000..000003}}.tar"}  # fmt: skip
    epochs: dict[str, list] = {}
    for name, spec in specs.items():
        for rank in (0, 1):
            dm = attach(WebDataModule(spec, batch_size=4, num_workers=2, latent_scale=1, shuffle_buffer=6), rank, 2)
            loader = dm.train_dataloader()
            if name == "http" and rank == 0:  # the manifest and the probe's first shard: no shard is read to count
                assert set(requested) == {"/manifest.json", "/train-000000.tar"}
            workers = [batches(loader.stream.worker_batches(w, 0)) for w in (0, 1)]  # what each worker yields
            epochs[name, rank] = (len(loader), workers, loader.stream.quotas)
    for rank in (0, 1):
        assert epochs["http", rank] == epochs["local", rank] == epochs["pipe", rank]
    read = {(rank, w): {i for b in epochs["local", rank][1][w] for i in b} for rank in (0, 1) for w in (0, 1)}
    assert epochs["local", 0][0] == epochs["local", 1][0] == 3  # equal batches per rank: min(4, 3) full batches of 4
    assert sum(map(len, read.values())) == len(set.union(*read.values())) == 2 * 3 * 4  # disjoint
    assert len(set(requested)) == 1 + 4  # the loaders read every shard over HTTP

    # the manifest's counts are used (an under-count of shard 0 shows in the quotas), and a missing one is one line
    write_counts_manifest(directory, {"train-000000.tar": 4, **{Path(p).name: 8 for p in local[1:]}})
    dm = attach(WebDataModule(specs["http"], val_shards=specs["http"], batch_size=4, num_workers=2, latent_scale=1))
    assert dm.train_dataloader().stream.quotas == dm.val_dataloader().stream.quotas == [1 + 2, 2 + 2]
    shutil.copy(directory / "manifest.json", tmp_path / "counts.json")  # data.manifest: anywhere, any name
    for manifest in (str(tmp_path / "counts.json"), f"pipe:cat {tmp_path}/counts.json", f"{base}/manifest.json"):
        named = attach(WebDataModule(specs["pipe"], manifest=manifest, batch_size=4, num_workers=0, latent_scale=1))
        assert named.train_dataloader().stream.quotas == [1 + 2 + 2 + 2]
    os.remove(directory / "manifest.json")
    with pytest.raises(ValueError, match=rf"^data\.shards: 4 shard URL\(s\) have no sample count in a manifest "
                                         rf"\(first: {base}/train-000000\.tar; manifest looked for: {base}/manifest"
                                         r"\.json\); counting them would read them whole\."):  # fmt: skip
        attach(WebDataModule(specs["http"], batch_size=4, num_workers=0, latent_scale=1)).train_dataloader()
    with pytest.raises(FileNotFoundError, match=f"^read_manifest: no manifest.json in {directory} "):
        WebDataModule(specs["http"], manifest=str(directory), batch_size=4, num_workers=0, latent_scale=1)
    epoch_length = attach(WebDataModule(specs["http"], batch_size=4, num_workers=0, latent_scale=1, epoch_length=2))
    assert len(batches(epoch_length.train_dataloader())) == 2  # no counts needed


def test_the_manifest_of_url_shards_is_fetched_once_per_datamodule(make_shards, serve):
    local = make_shards([8, 8])
    directory = Path(local[0]).parent
    write_counts_manifest(directory, {Path(p).name: 8 for p in local})
    base, requested = serve(directory)
    spec = f"{base}/train-{{000000..000001}}.tar"
    for manifest in (None, f"{base}/manifest.json"):  # beside the shards, or named with data.manifest
        requested.clear()
        dm = WebDataModule(spec, manifest=manifest, batch_size=4, num_workers=0, latent_scale=1)
        assert dm.shards_manifest() is dm.shards_manifest() and dm.shards_manifest()["splits"]
        assert requested.count("/manifest.json") == 1  # construction (named check, latent scale) and later calls


def test_a_resumed_url_stream_continues_exactly(make_shards):
    local = make_shards([8, 8, 8, 5])
    spec = f"pipe:cat {Path(local[0]).parent}/train-{{000000..000003}}.tar"
    dm = attach(WebDataModule(spec, batch_size=4, num_workers=0, latent_scale=1, shuffle_buffer=6, epoch_length=5))
    loader = dm.train_dataloader()
    whole = batches(loader)
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    head = [next(iterator)["x"][:, 0, 0, 0].long().tolist() for _ in range(2)]
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert head + batches(resumed) == whole and len(whole) == 5


def test_damage_over_http_is_charged_to_the_budget_as_for_files(make_shards, serve):
    good, truncated, cut_between = make_shards([4, 4, 4])
    with tarfile.open(truncated) as tar:
        os.truncate(truncated, tar.getmember("000006.img_feature256.npy").offset_data + 10)
    with tarfile.open(cut_between) as tar:
        os.truncate(cut_between, tar.getmember("000010.img_feature256.npy").offset)
    base, _ = serve(Path(good).parent)
    urls = [f"{base}/{Path(p).name}" for p in (good, truncated, cut_between)]
    got = {}
    for name, shards in (("local", [good, truncated, cut_between]), ("http", urls)):
        budget = BadSampleBudget(5)
        got[name] = [s["__key__"] for s in read_shards(shards, budget)], budget.count
    # the sample before each cut is dropped (it may miss members), the tar cut between members is found on a stream
    assert got["http"] == got["local"] == (["000000", "000001", "000002", "000003", "000004", "000008"], 2)
    assert complete_shard_keys(urls[0]) == ["000000", "000001", "000002", "000003"]  # prepare's resume check
    assert complete_shard_keys(f"pipe:cat {good}") == complete_shard_keys(good)
    with pytest.raises(tarfile.ReadError, match="no end-of-archive marker"):
        complete_shard_keys(urls[2])
    with pytest.raises(BadSampleBudgetExceeded, match=f"max_bad_samples=1; the last: shard {urls[2]} key after"):
        list(read_shards(urls, BadSampleBudget(1)))


def test_a_shard_that_cannot_be_read_is_one_line_naming_it(make_shards, serve, tmp_path):
    local = make_shards([4, 4], image="png")
    directory = Path(local[0]).parent
    base, _ = serve(directory)
    tail = ". Check that it exists and is reachable from this machine (or remove it from the shard list)"
    port = free_port()
    cases = {
        f"{base}/train-000009.tar": "curl exited with status 22: HTTP error (e.g. 404 Not Found, 403 Forbidden)",
        f"http://127.0.0.1:{port}/train-000000.tar": "curl exited with status 7: connection refused",
        f"pipe:cat {directory}/nothing.tar 2>/dev/null": "the command exited with status 1",
        str(directory / "nothing.tar"): "FileNotFoundError: No such file or directory",
    }
    for url, reason in cases.items():
        with pytest.raises(ShardUnreachable) as raised:
            list(read_shards([local[0], url], BadSampleBudget(100)))  # not damage: the budget does not apply
        assert str(raised.value) == f"cannot read shard {url}: {reason}{tail}"
    # reference statistics read URLs too, and stop with the same line
    urls = [f"{base}/{Path(p).name}" for p in local]
    assert all((a == b).all() for a, b in zip(shard_images(urls, "png", 8), shard_images(local, "png", 8), strict=True))
    with pytest.raises(DataError, match=f"^cannot read shard {base}/x.tar: curl exited with status 22"):
        list(shard_images([f"{base}/x.tar"], "png", 8))
    # from DataLoader workers: the same one line reaches the main process (the probe reads shard 0 only)
    dm = attach(WebDataModule([urls[0], f"{base}/train-000009.tar"], kind="image", resolution=8, batch_size=2,
                              num_workers=2, epoch_length=2))  # fmt: skip
    with pytest.raises(ShardUnreachable) as raised:
        list(dm.train_dataloader())
    assert str(raised.value) == f"cannot read shard {base}/train-000009.tar: {cases[f'{base}/train-000009.tar']}{tail}"
    with pytest.raises(FileNotFoundError, match=f"^read_manifest: cannot read {base}/manifest.json .*status 22"):
        read_manifest(f"{base}/train-000000.tar")
    # at start-up (the shape probe reads the first shard) the CLI prints this line, not the tar error that revealed it
    refused = f"http://127.0.0.1:{port}/train-000000.tar"
    with pytest.raises(ShardUnreachable) as raised:
        WebDataModule(refused, kind="image", resolution=8, epoch_length=2)
    wrapped = ValueError("jsonargparse's wrapper")
    wrapped.__cause__ = raised.value
    assert root_cause(wrapped) is raised.value
    assert str(raised.value) == f"cannot read shard {refused}: {cases[refused]}{tail}"


def test_prepare_refuses_an_out_url_in_one_line(tmp_path, capsys):
    from PIL import Image

    from datamodules.prepare import main

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # one input

    assert main(["images", str(tmp_path), "--out", "https://h/shards", "--latents", "none"]) == 1
    assert capsys.readouterr().err == (
        "error: --out https://h/shards: must be a local directory; upload it afterwards (e.g. aws s3 sync OUT "
        "s3://bucket/dir/) and train on the URLs\n"
    )
