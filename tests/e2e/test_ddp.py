"""DDP through cli.py on CPU (gloo, 2 processes; Lightning starts rank 1 by re-running the command) on webdataset
shards: replicas stay identical after every optimizer step (raw and EMA weights), ranks read disjoint shards (rank and
world size from torch.distributed), and a DDP checkpoint resumes on 2 processes (exactly) and on 1 process (elastic
resume: the rest of the epoch, every sample once, the global batch kept by accumulating 2 batches).

Data: the quickstart's tiny model on 96 latents (1, 32, 32), sample i filled with i (so a batch record's per-sample
sum is 1024 i), in 12 shards of 8; batches of 8 per rank: 6 per rank and epoch, none dropped. The embedded quickstart
data's own rank split is tested in-process (tests/datamodules/test_embedded.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.datamodules.conftest import write_shards
from tests.e2e.helpers import QUICKSTART, run_cli
from tests.e2e.probes import by_step, load, loader_state, max_differences, read_batches, read_meta

pytestmark = pytest.mark.slow

DDP_CONFIG = """
trainer:
  max_steps: 6
  val_check_interval: 2
  limit_val_batches: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 2
        save_last: true
        save_top_k: -1
        filename: "step{step:06d}"
        auto_insert_metric_name: false
data:
  class_path: datamodules.WebDataModule
  init_args:
    shards: {shards}
    latent_scale: 1
    batch_size: 8
    num_workers: 0
"""
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
PROBES = ["--trainer.callbacks+=tests.e2e.probes.BatchProbe", "--trainer.callbacks+=tests.e2e.probes.ReplicaProbe"]


def fit(tmp: Path, name: str, *args: str, check: bool = True):
    """``cli.py fit`` with both probes writing under ``tmp/name``; logs under ``tmp/name/runs``."""
    config = tmp / "ddp.yaml"
    if not config.exists():
        shards = write_shards(tmp / "shards", [8] * 12, latent_shape=(1, 32, 32))
        config.write_text(DDP_CONFIG.replace("{shards}", str(Path(shards[0]).parent)))
    out = tmp / name
    out.mkdir()
    env = {"ZIGMA_BATCH_PROBE": str(out / "batches"), "ZIGMA_REPLICA_PROBE": str(out / "replicas")}
    proc = run_cli("fit", *QUICKSTART, "--config", str(config), *PROBES, *args, runs=out / "runs", env=env,
                   check=check, timeout=240)  # fmt: skip
    return out, proc


def report(name: str, diffs: dict[str, float]) -> None:
    print(f"{name}: max |Δ| " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-6, diffs


def replica_lines(out: Path, rank: int) -> list[str]:
    return Path(f"{out}/replicas.rank{rank}").read_text().splitlines()


def samples(record: dict) -> list[int]:
    """The sample indices of a batch record (sample i is a latent of 1024 elements filled with i)."""
    return [round(total / 1024) for total in record["sum"]]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out, _ = fit(tmp, "first", *DDP)
    return tmp, out


def test_ddp_replicas_stay_identical_and_ranks_read_disjoint_batches(ddp_run):
    _, out = ddp_run
    assert not Path(f"{out}/replicas.fail").exists(), Path(f"{out}/replicas.fail").read_text()
    for rank in range(2):
        assert replica_lines(out, rank) == [f"{step} ok world=2" for step in range(1, 7)]
        meta = read_meta(out / "batches", rank)
        assert meta["loader"] == "ShardLoader" and meta["world_size"] == 2  # Lightning did not re-wrap it
    ranks = [by_step(read_batches(out / "batches", rank)) for rank in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(6))  # equal batch counts
    epoch0 = [i for r in range(2) for s in range(6) for i in samples(ranks[r][s])]  # 6 steps = one epoch per rank
    assert sorted(epoch0) == list(range(96))  # every sample once: disjoint across ranks and steps
    ckpt = load(out / "runs" / "quickstart" / "version_0" / "checkpoints" / "step000004.ckpt")
    assert loader_state(ckpt)["world_size"] == 2 and loader_state(ckpt)["batches_done"] == 4


def test_ddp_checkpoint_resumes_exactly_on_two_processes(ddp_run):
    tmp, first = ddp_run
    step4 = first / "runs" / "quickstart" / "version_0" / "checkpoints" / "step000004.ckpt"
    out, _ = fit(tmp, "resume2", *DDP, "--ckpt_path", str(step4))
    assert not Path(f"{out}/replicas.fail").exists()
    for rank in range(2):
        assert replica_lines(out, rank) == ["5 ok world=2", "6 ok world=2"]
        assert read_meta(out / "batches", rank)["state"]["batches_done"] == 4
        resumed = by_step(read_batches(out / "batches", rank))
        reference = by_step(read_batches(first / "batches", rank))
        assert sorted(resumed) == [4, 5] and all(resumed[s] == reference[s] for s in (4, 5))
    final = load(out / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    reference = load(first / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == 6
    report("ddp 2 -> 2 processes", max_differences(final, reference))


def test_ddp_checkpoint_resumes_on_one_process_with_every_sample_once_and_the_global_batch(ddp_run):
    """After 4 steps on 2 ranks 64 of the 96 samples were read; one process with ``data.keep_global_batch`` reads the
    other 32 in 4 batches of 8 (batch 8 of 12 onwards), 2 per optimizer step (accumulation 2: global batch 16)."""
    tmp, first = ddp_run
    step4 = first / "runs" / "quickstart" / "version_0" / "checkpoints" / "step000004.ckpt"
    out, proc = fit(tmp, "resume1", "--ckpt_path", str(step4), "--data.init_args.keep_global_batch", "true")
    assert ("train data: epoch 0 continues after 64 samples with 32 unread ones in 4 batches per process, from batch 8 "
            "of 12; checkpoint 2 processes x 1 workers x batch 8, now 1 x 1 x 8; data.keep_global_batch: "
            "trainer.accumulate_grad_batches 1 -> 2 (global batch 16)") in proc.stdout + proc.stderr  # fmt: skip
    assert replica_lines(out, 0) == ["4 ok world=1", "5 ok world=1", "5 ok world=1", "6 ok world=1"]  # per batch
    state = read_meta(out / "batches", 0)["state"]
    assert (state["batches_done"], state["segments"], state["world_size"]) == (8, [[2, 1, 8, 4]], 1)
    resumed = read_batches(out / "batches", 0)
    assert [r["step"] for r in resumed] == [4, 4, 5, 5]
    two = [by_step(read_batches(first / "batches", rank)) for rank in range(2)]
    before = [i for rank in range(2) for step in range(4) for i in samples(two[rank][step])]
    assert sorted(before + [i for r in resumed for i in samples(r)]) == list(range(96))
    final = load(out / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 6 and torch.isfinite(final["state_dict"]["model.final_layer.linear.weight"]).all()
