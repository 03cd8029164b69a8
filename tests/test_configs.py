"""Every shipped config parses through the real CLI parser (in-process) and composes as its header says: each paper
experiment names a trainer, a model preset, a data config and an eval config and repeats none of their values; the
model and the data it resolves to are instantiated (the model on the ``meta`` device: no memory for 1.5B
parameters) and fit each other (sample shape, classes, caption width, latent scale)."""

from __future__ import annotations

import io
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import import_object

from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
MODEL_CONFIGS = sorted((CONFIGS / "model").glob("*.yaml"))
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))
EVAL_CONFIGS = sorted((CONFIGS / "eval").glob("*.yaml"))
PAPER_PARTS = ("trainer", "model", "data", "eval")  # what a paper experiment composes, in this order
# What each dataset's shards hold (upstream's layouts): the latent shape of one sample, or a clip's (T, C, h, w), and
# the caption features (N_cap, L, d). The models must fit these.
DATASETS = {
    "celebamm256_latents": {"latent": (4, 32, 32)},
    "churches256_latents": {"latent": (4, 32, 32)},
    "coco14_text_latents": {"latent": (4, 32, 32), "captions": (5, 77, 768)},
    "facehq1024_latents": {"latent": (4, 128, 128)},
    "ucf101_latents": {"video": (17, 4, 32, 32)},
}


class _ParseOnly:
    """The real ``ZigMaCLI`` parser (its ``fid``/``fvd`` sections included), built once; nothing is instantiated."""

    parser = None

    @classmethod
    def get(cls):
        if cls.parser is None:
            from datamodules import ZigMaDataModule
            from zigma.flow_module import FlowMatchingModule
            from zigma_lightning.cli import ZigMaCLI

            class ParseOnly(ZigMaCLI):
                def instantiate_classes(self) -> None:
                    pass

                def after_instantiate_classes(self) -> None:
                    pass

            args = ["--config", str(CONFIGS / "quickstart.yaml")]
            cli = ParseOnly(FlowMatchingModule, ZigMaDataModule, subclass_mode_data=True, run=False, args=args)
            cls.parser = cli.parser
        return cls.parser


def parse(*configs: Path | str, **flags: str) -> Namespace:
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    args += [a for key, value in flags.items() for a in (f"--{key}", value)]
    return _ParseOnly.get().parse_args(args)


def composed_files(experiment: Path) -> list[str]:
    """The configs an experiment's ``# compose:`` header line names (relative to configs/), in order."""
    line = re.search(r"^# compose: (.+)$", experiment.read_text(), re.MULTILINE)
    assert line, f"{experiment.name}: no '# compose: ...' header line naming the configs it builds on"
    return line.group(1).split()


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a YAML mapping (a list is one leaf)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in leaves(value, f"{prefix}{key}.").items()}


def load_leaves(relative: str) -> dict[str, object]:
    return {k.rstrip("."): v for k, v in leaves(yaml.safe_load((CONFIGS / relative).read_text())).items()}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_dataset_shard(directory: Path, data_config: str, init_args: Namespace) -> str:
    """A 2-sample shard with the keys the data config reads and the shapes of its dataset (``DATASETS``)."""
    facts = DATASETS[data_config]
    path = directory / "train-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(2):
            sample = {"__key__": f"{i:06d}"}
            if "video" in facts:
                sample[init_args.video_key.split(";")[0]] = npy(np.zeros(facts["video"], np.float32))
            else:
                sample[init_args.latent_key.split(";")[0]] = npy(np.zeros(facts["latent"], np.float32))
            if init_args.get("label_key"):
                sample[init_args.label_key.split(";")[0]] = str(i).encode()
            if init_args.get("caption_key"):
                shape = facts.get("captions", (5, 77, 768))  # upstream's CLIP ViT-L/14 features
                sample[init_args.caption_key] = npy(np.zeros(shape, np.float32))
            sink.write(sample)
    return str(path)


def instantiate(cfg: Namespace, monkeypatch):
    """(model with its backbone on the meta device, data) as LightningCLI builds them from the parsed config."""
    import zigma.flow_module
    from zigma.flow_module import FlowMatchingModule

    monkeypatch.setattr(zigma.flow_module, "ZigMa", partial(zigma.flow_module.ZigMa, device="meta"))
    data = import_object(cfg.data.class_path)(**cfg.data.init_args.as_dict())
    with torch.device("meta"):  # every parameter on meta: no memory, no initialisation arithmetic
        return FlowMatchingModule(**cfg.model.as_dict()), data


def test_model_configs_name_existing_presets_and_compose_with_the_quickstart():
    from zigma import PRESETS

    for path in MODEL_CONFIGS:
        assert yaml.safe_load(path.read_text())["model"]["preset"] in PRESETS
        cfg = parse("quickstart.yaml", f"model/{path.name}")
        assert cfg.model.preset == path.stem
        assert cfg.trainer.gradient_clip_val == 2.0  # the upstream recipe's clipping comes with the model config


def test_evaluation_configs_parse():
    for path in EVAL_CONFIGS:
        cfg = parse("quickstart.yaml", f"eval/{path.name}")
        section = cfg[path.stem[:3]]  # fid5k -> fid, fvd2048 -> fvd
        assert section.num_samples in (5000, 2048) and section.sample_method == "euler"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_composes_its_configs_and_repeats_none_of_their_values(experiment):
    files = composed_files(experiment)
    for relative in files:
        assert (CONFIGS / relative).is_file(), f"{experiment.name} composes {relative}, which does not exist"
    if files[0] != "quickstart.yaml":  # a paper setup: one of each part, in order, sharing no key
        assert [f.split("/")[0] for f in files] == list(PAPER_PARTS), files
        seen: dict[str, str] = {}
        for relative in files:
            for key in load_leaves(relative):
                assert key not in seen, f"{key} is set in both {seen[key]} and {relative}"
                seen[key] = relative
    base = {k: v for relative in files for k, v in load_leaves(relative).items()}
    repeated = [k for k, v in load_leaves(f"experiments/{experiment.name}").items() if k in base and base[k] == v]
    assert not repeated, f"{experiment.name} repeats values of the configs it composes: {repeated}"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_instantiates_a_model_that_fits_its_data(experiment, tmp_path, monkeypatch):
    files = composed_files(experiment)
    data_config = next((Path(f).stem for f in files if f.startswith("data/")), None)
    cfg = parse(*files, f"experiments/{experiment.name}")
    assert cfg.trainer.logger.init_args.name.startswith(experiment.stem.split("_")[0])
    if data_config is not None:  # a paper setup: its data config reads shards shaped like the dataset's
        cfg.data.init_args.shards = write_dataset_shard(tmp_path, data_config, cfg.data.init_args)
        cfg.data.init_args.val_shards = None
        cfg.data.init_args.num_workers = 0
        assert cfg.model.vae and cfg.data.init_args.latent_scale is None  # the scale comes from the data/VAE
    model, data = instantiate(cfg, monkeypatch)
    assert next(model.parameters()).device.type == "meta"
    if data.sample_shape is not None:
        assert tuple(model.sample_shape) == tuple(data.sample_shape)
    else:  # the quickstart faces: pixels the model consumes directly (no VAE)
        assert tuple(model.sample_shape) == tuple(data.pixel_shape)
    net = model.model
    assert max(net.num_classes, 0) == data.num_classes
    assert (net.config["d_context"] if net.has_text else 0) == data.context_dim
    if data_config is not None:
        from zigma.vae import SD_LATENT_SCALE

        assert data.latent_scale == data.vae_scale == SD_LATENT_SCALE  # upstream shards: no manifest, upstream's scale
        assert model.hparams.vae_scale is None  # the VAE's own scaling_factor (SD VAEs: the same number)


def test_the_digits_quickstart_instantiates_a_conditional_model_that_fits_its_data(monkeypatch):
    cfg = parse("quickstart_digits.yaml")
    model, data = instantiate(cfg, monkeypatch)
    assert tuple(model.sample_shape) == tuple(data.sample_shape) == (1, 8, 8)
    assert model.model.num_classes == data.num_classes == 10 and model.model.has_null_condition
    assert model.hparams.guidance_scale > 1
    grid = next(c for c in cfg.trainer.callbacks if c.class_path == "callbacks.SampleGridLogger").init_args
    assert grid.class_rows and grid.num_samples % 10 == 0 and grid.guidance_scale > 1
