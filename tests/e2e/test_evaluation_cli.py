"""FID through ``cli.py``: during ``fit`` (in TensorBoard), reproduced for a checkpoint by ``validate`` and ``test``,
and identical on 1 and 2 DDP processes (gloo), where every fake is counted exactly once and the two ranks compute the
reference statistics together (each its share of the reals), equal to the 1-process ones.

The quickstart's tiny test model is evaluated against the embedded faces (its DataModule's reference pixels) with the
real Inception loading code on random weights (64-d pool features, to keep CPU time small). The runs go through
``cli.main`` in-process, except the 2-process one (Lightning starts rank 1 by re-running the command).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.helpers import QUICKSTART, main_in_process, run_cli
from tests.e2e.helpers import tensorboard_scalars as scalars
from zigma.metrics.frechet import GaussianStats

pytestmark = pytest.mark.slow


def fid_args(weights: Path, cache: Path, count: int = 5) -> list[str]:
    return ["--fid.num_samples", str(count), "--fid.batch_size", "2", "--fid.sample_steps", "3", "--fid.feature", "64",
            "--fid.weights_path", str(weights), "--fid.reference_cache_dir", str(cache)]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, random_inception_weights):
    tmp = tmp_path_factory.mktemp("fid_fit")
    runs = tmp / "runs"
    main_in_process("fit", *QUICKSTART, *fid_args(random_inception_weights, tmp / "cache"), runs=runs)
    return tmp, runs


def validate(tmp: Path, ckpt: Path, weights: Path, name: str, *args: str, in_subprocess: bool = False,
             cache: str = "cache") -> dict:  # fmt: skip
    """``cli.py validate`` of ``ckpt`` with the FID settings and reference cache ``tmp/cache`` (in-process unless
    ``in_subprocess``: DDP re-runs the command for rank 1); returns the TensorBoard scalars it logged."""
    args = ("validate", *QUICKSTART, "--ckpt_path", str(ckpt), *args, *fid_args(weights, tmp / cache))
    if in_subprocess:
        run_cli(*args, runs=tmp / name, timeout=300)
    else:
        main_in_process(*args, runs=tmp / name)
    return scalars(tmp / name)


@pytest.fixture(scope="module")
def validated(fitted, random_inception_weights):
    """``validate`` of the step-4 checkpoint on one process, shared by both tests."""
    tmp, runs = fitted
    (ckpt,) = runs.rglob("step000004.ckpt")
    return ckpt, validate(tmp, ckpt, random_inception_weights, "validate")


def test_fit_logs_fid_in_tensorboard_and_validate_reproduces_it_for_a_checkpoint(
    fitted, validated, random_inception_weights
):
    tmp, runs = fitted
    during_fit = scalars(runs)
    assert [step for step, _ in during_fit["val/fid_5"]] == [step for step, _ in during_fit["val/loss"]]
    assert len(during_fit["val/fid_5"]) == 2 and all(v == 5 for _, v in during_fit["val/fid_samples"])
    ckpt, logged = validated
    reproduced = logged["val/fid_5"][0][1]
    assert reproduced == pytest.approx(during_fit["val/fid_5"][-1][1], rel=1e-4)  # the step-4 EMA, same fakes

    out = tmp / "test"
    main_in_process("test", *QUICKSTART, "--ckpt_path", str(ckpt), *fid_args(random_inception_weights, tmp / "cache"),
                    runs=out)  # fmt: skip
    assert scalars(out)["test/fid_5"][0][1] == pytest.approx(reproduced, rel=1e-4)
    assert len(list((tmp / "cache").glob("*.npz"))) == 1  # one reference computation for all three runs


def test_ddp_ranks_generate_distinct_fakes_counted_once(fitted, validated, random_inception_weights):
    """The 2-process validate against the shared 1-process one (quickstart: accelerator cpu, devices 1)."""
    tmp, _ = fitted
    ckpt, one = validated
    two = validate(tmp, ckpt, random_inception_weights, "ddp2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                   "--trainer.accelerator", "cpu", in_subprocess=True, cache="cache_ddp2")  # fmt: skip
    values = {}
    for devices, logged in ((1, one), (2, two)):
        assert logged["val/fid_samples"][0][1] == 5  # 5 fakes split 3 + 2 over two ranks: the sum, not 2 x 5
        values[devices] = logged["val/fid_5"][0][1]
    # the same 5 fakes (noise by global index) whatever the world size; a fake counted twice would change the
    # covariance normalisation and the value
    assert values[2] == pytest.approx(values[1], rel=1e-4)
    # an empty cache: both ranks extracted a share of the 5 faces; the merged statistics are the 1-process ones
    (one_file,), (two_file,) = (tmp / "cache").glob("*.npz"), (tmp / "cache_ddp2").glob("*.npz")
    single, merged = GaussianStats.load(one_file), GaussianStats.load(two_file)
    assert merged.count == single.count == 5 and merged.meta == single.meta
    scale = single.cov.abs().max().item()  # float32 features of other batch compositions: rounding-level differences
    torch.testing.assert_close(merged.mean, single.mean, rtol=1e-5, atol=1e-5 * single.mean.abs().max().item())
    torch.testing.assert_close(merged.cov, single.cov, rtol=1e-5, atol=1e-5 * scale)
