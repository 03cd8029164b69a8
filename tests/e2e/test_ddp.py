"""DDP through cli.py on CPU (gloo, 2 processes; Lightning starts rank 1 by re-running the command): replicas stay
identical after every optimizer step (raw and EMA weights), ranks read disjoint batches from the embedded data's own
rank split, and a DDP checkpoint resumes on 2 processes (exactly) and on 1 process (data position carried over).

Data: 100 faces in batches of 8 per rank: 6 batches per rank and epoch, 4 faces dropped. Global batch j is the
positions [16j, 16j + 16) of the epoch order, rank 0 reading the first 8 and rank 1 the last 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
  init_args:
    batch_size: 8
    repeats: 1
"""
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
PROBES = ["--trainer.callbacks+=tests.e2e.probes.BatchProbe", "--trainer.callbacks+=tests.e2e.probes.ReplicaProbe"]


def fit(tmp: Path, name: str, *args: str, check: bool = True):
    """``cli.py fit`` with both probes writing under ``tmp/name``; logs under ``tmp/name/runs``."""
    config = tmp / "ddp.yaml"
    config.write_text(DDP_CONFIG)
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


def samples(record: dict) -> list[tuple[float, float]]:
    return list(zip(record["sum"], record["wsum"]))


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
        assert meta["loader"] == "ResumableLoader" and meta["world_size"] == 2  # Lightning did not re-wrap it
    ranks = [by_step(read_batches(out / "batches", rank)) for rank in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(6))  # equal batch counts
    epoch0 = [set(samples(ranks[r][s])) for r in range(2) for s in range(6)]  # 6 steps = one epoch per rank
    assert sum(map(len, epoch0)) == len(set().union(*epoch0)) == 96  # disjoint across ranks and steps
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


def test_ddp_checkpoint_resumes_on_one_process(ddp_run):
    """After 4 steps on 2 ranks the first 4 x 16 items of the epoch were read; one process reads on from item 64:
    its steps 4 and 5 are exactly what ranks 0 and 1 read at step 4 of the 2-process run."""
    tmp, first = ddp_run
    step4 = first / "runs" / "quickstart" / "version_0" / "checkpoints" / "step000004.ckpt"
    out, proc = fit(tmp, "resume1", "--ckpt_path", str(step4))
    assert "2 processes x batch 8" in proc.stdout + proc.stderr  # the world-size change is reported
    assert replica_lines(out, 0) == ["5 ok world=1", "6 ok world=1"]
    assert read_meta(out / "batches", 0)["state"]["batches_done"] == 8
    resumed = by_step(read_batches(out / "batches", 0))
    two = [by_step(read_batches(first / "batches", rank)) for rank in range(2)]
    assert sorted(resumed) == [4, 5]
    assert samples(resumed[4]) == samples(two[0][4]) and samples(resumed[5]) == samples(two[1][4])
    final = load(out / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 6 and torch.isfinite(final["state_dict"]["model.final_layer.linear.weight"]).all()
