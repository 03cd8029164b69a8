"""Every shipped config parses through the real CLI (``--print_config``) and resolves to a buildable model."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

MODEL_CONFIGS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


def print_config(*configs: Path) -> dict:
    args = [a for c in configs for a in ("--config", str(c))]
    out = subprocess.run([sys.executable, "cli.py", "fit", *args, "--print_config"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return yaml.safe_load(out)


@pytest.mark.slow
@pytest.mark.parametrize("model_config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_configs_compose_with_data_configs(model_config):
    cfg = print_config(ROOT / "configs/quickstart.yaml", model_config)
    assert cfg["model"]["preset"] == model_config.stem
    assert cfg["trainer"]["gradient_clip_val"] == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiments_parse(experiment):
    cfg = print_config(ROOT / "configs/quickstart.yaml", experiment)
    assert cfg["model"]["net"]["in_channels"] == 1  # merged key by key with the quickstart's net


def test_model_configs_name_existing_presets():
    from zigma import PRESETS

    for path in MODEL_CONFIGS:
        assert yaml.safe_load(path.read_text())["model"]["preset"] in PRESETS


@pytest.mark.slow
@pytest.mark.parametrize("evaluation", sorted((ROOT / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_evaluation_configs_parse(evaluation):
    cfg = print_config(ROOT / "configs/quickstart.yaml", evaluation)
    section = cfg[evaluation.stem[:3]]  # fid5k -> fid, fvd2048 -> fvd
    assert section["num_samples"] in (5000, 2048) and section["sample_method"] == "euler"
