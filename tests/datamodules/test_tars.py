"""``datamodules.tars``: shard patterns and tar reading through webdataset's URL opening."""

import io
import tarfile

from datamodules.shards import BadSampleBudget, read_shards
from datamodules.tars import expand_pattern, open_shard, spec_parts, tar_samples


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_patterns_expand_braces_then_globs_and_keep_missing_names(tmp_path):
    for i in (0, 1, 2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    assert spec_parts(f"{tmp_path}/a.tar, {tmp_path}/b.tar  c.tar") == [
        f"{tmp_path}/a.tar",
        f"{tmp_path}/b.tar",
        "c.tar",
    ]
    assert spec_parts(["x.tar y.tar", "z.tar"]) == ["x.tar", "y.tar", "z.tar"]
    names = [p.rsplit("/", 1)[-1] for p in expand_pattern(f"{tmp_path}/train-{{000002,000000}}.tar")]
    assert names == ["train-000002.tar", "train-000000.tar"]  # pattern order
    names = [p.rsplit("/", 1)[-1] for p in expand_pattern(f"{tmp_path}/train-*.tar")]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert expand_pattern(f"{tmp_path}/val-{{0..1}}.tar") == [f"{tmp_path}/val-0.tar", f"{tmp_path}/val-1.tar"]


def test_a_shard_reads_the_same_from_a_path_and_a_pipe_url(tmp_path):
    shard = tmp_path / "s.tar"
    _write_tar(shard, [("a.jpg", b"1"), ("a.cls", b"3"), ("__key__", b"meta"), ("b.JPG", b"2")])
    with open_shard(str(shard)) as stream:
        local = list(tar_samples(str(shard), stream))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in local] == [
        ("a", ["cls", "jpg"]),
        ("b", ["jpg"]),  # suffixes lower-cased, metadata members skipped
    ]
    url = f"pipe:cat {shard}"
    budget = BadSampleBudget(0)
    piped = list(read_shards([url], budget))  # a stream: its end-of-archive marker is checked too (whole here)
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in piped] == [
        {k: v for k, v in s.items() if k != "__url__"} for s in local
    ]
    assert budget.count == 0 and piped[0]["__url__"] == url
