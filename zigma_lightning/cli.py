"""The LightningCLI of ``zigma fit|validate|test|predict --config configs/...yaml [--key value ...]`` (also
``python cli.py ...``).

A LightningCLI over :class:`zigma.flow_module.FlowMatchingModule` and the DataModules in ``datamodules``. Beyond
Lightning's defaults it (1) resolves ``--ckpt_path last`` to the newest intact checkpoint of the run (step
checkpoints, ``last.ckpt`` and SLURM preemption ``hpc_ckpt_*.ckpt`` alike, each checked against its CRC-32s; a
truncated or corrupt newest file is reported in one line and skipped; an explicit corrupt path is an error), and
keeps writing to that run's TensorBoard directory; (2) overwrites the saved
``config.yaml`` on resume instead of failing; (3) writes checkpoints atomically (``AtomicCheckpointIO``);
(4) under SLURM, enables ``SLURMEnvironment(auto_requeue=True)``, pins the run directory to the job id and resumes
by default, so a preempted job saves, requeues itself and continues the same run; (5) checks that the model fits the
data before any step; (6) reports configuration errors in one line (``ZIGMA_DEBUG=1`` for the traceback), with a
"did you mean" for mistyped keys, and unwritable run directories before any step; (7) with a checkpoint, takes the
architecture from it and every other setting from the configs and command line (LightningCLI alone would replace
all ``model`` settings with the saved ones), and refuses ``predict``/``validate``/``test`` without a checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from callbacks import SampleWriter
from callbacks.evaluation import FIDEvaluation, FVDEvaluation
from callbacks.slurm import StepBoundaryRequeue
from datamodules import ZigMaDataModule
from datamodules.errors import DataError
from zigma.flow_module import ARCHITECTURE_SETTINGS, RUNTIME_NET_KEYS, FlowMatchingModule, saved_architecture
from zigma_lightning.arguments import ArgumentDiagnosis
from zigma_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from zigma_lightning.errors import ConfigError
from zigma_lightning.extras import missing_extra_message
from zigma_lightning.resume import check_checkpoint_path, logger_dirs, resolve_last, setup_slurm_run

log = logging.getLogger("zigma.cli")

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "zigma"},
}


class ZigMaCLI(LightningCLI):
    """LightningCLI with run discovery, checkpoint precedence, checks before any step and one-line errors.

    Only LightningCLI's documented hooks are overridden (``init_parser``, ``add_arguments_to_parser``,
    ``parse_arguments``, ``before_instantiate_classes``, ``instantiate_classes``, ``instantiate_trainer``,
    ``after_instantiate_classes``, ``before_fit``)."""

    def init_parser(self, **kwargs):
        """Parsers raise instead of printing the usage and exiting, so :meth:`parse_arguments` can report one line."""
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SampleWriter, "predict_writer")
        # FID/FVD at the end of each validation (fit, validate) and test; off until fid.num_samples / fvd.num_samples
        parser.add_lightning_class_args(FIDEvaluation, "fid")
        parser.add_lightning_class_args(FVDEvaluation, "fvd")
        self.subcommand_parsers = [*getattr(self, "subcommand_parsers", []), parser]  # for the keys they accept

    def parse_arguments(self, parser, args) -> None:
        """Parse; keep the parsed configuration and the arguments (:meth:`explicit_model_settings` reads them again
        without defaults). A refused argument becomes one line (:class:`ArgumentDiagnosis`). A checkpoint is
        resolved (``last``, SLURM) and verified here, before anything reads it."""
        self.given_args = sys.argv[1:] if args is None else args
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(self.describe_refusal(parser, err)) from err
        sub = self.config.get("subcommand")
        if sub is not None:
            self.resolve_checkpoint(sub, self.config[sub])
        self.parsed_config = self.config.clone()
        if sub is not None:  # LightningCLI would next load the whole checkpoint to replace every model setting with
            self.config[sub]["ckpt_path"] = None  # its saved ones; restored by before_instantiate_classes

    def describe_refusal(self, parser, err: ArgumentError) -> str:
        """Which given argument the parser refused, and why (worked out from the arguments, not the error text)."""
        args = list(self.given_args) if not hasattr(self.given_args, "items") else []
        sub = args[0] if args and not args[0].startswith("-") else None
        line = None
        if sub is not None:
            known = {key for p in getattr(self, "subcommand_parsers", []) for key in p.get_defaults().keys()}  # noqa: SIM118 (a Namespace's keys() are dotted)
            classes = {"model": self.model_class, "trainer": self.trainer_class, "data": self.datamodule_class,
                       "predict_writer": SampleWriter, "fid": FIDEvaluation, "fvd": FVDEvaluation}  # fmt: skip
            diagnosis = ArgumentDiagnosis(lambda a: parser.parse_args([sub, *a]), sub, known, classes)
            line = diagnosis.explain(args[1:])
        return line or "invalid configuration: " + " ".join(str(err).split())

    def resolve_checkpoint(self, sub: str, cfg) -> None:
        """``--ckpt_path``: required except for fit; ``last`` (and a requeued SLURM job) -> the newest intact
        checkpoint; an explicit path must be intact."""
        if sub != "fit" and not cfg.get("ckpt_path"):
            raise ConfigError(
                f"{sub} needs --ckpt_path (a checkpoint file, or 'last' for the newest run): without one it would "
                "use the untrained network's random weights"
            )
        if sub == "fit":
            setup_slurm_run(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            resolve_last(sub, cfg)
        elif ckpt_path and ckpt_path not in ("best", "hpc"):
            check_checkpoint_path(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Our precedence with a checkpoint (:meth:`apply_checkpoint_settings`) on the configuration as parsed.

        Between :meth:`parse_arguments` and this hook LightningCLI would replace every ``model`` value, the command
        line's and the configs' too, with the hyper-parameters saved in the checkpoint (a version that no longer has
        one of them would fail); :meth:`parse_arguments` hides ``ckpt_path`` from that step and the configuration it
        parsed is restored here, so the settings given take effect as documented."""
        sub = self.config.get("subcommand")
        if sub is None:
            return
        self.config = self.parsed_config
        self.apply_checkpoint_settings(sub)
        if sub == "fit":
            self.set_purge_step(self.config[sub])

    def explicit_model_settings(self, sub: str) -> dict[str, Any]:
        """The ``model`` settings the configs and the command line give, without the parser's defaults."""
        parse = self.parser.parse_object if hasattr(self.given_args, "items") else self.parser.parse_args
        given = parse(self.given_args, defaults=False).get(f"{sub}.model")
        return given.as_dict() if given is not None else {}

    def apply_checkpoint_settings(self, sub: str) -> None:
        """Precedence with a checkpoint: it fixes the architecture (``ARCHITECTURE_SETTINGS``; a conflicting value
        given is refused); every other ``model`` setting given on the command line or in a config takes effect, and
        the checkpoint's saved values fill in the rest. The settings that differ from the checkpoint's are logged once.
        The resolved config (saved as the run's ``config.yaml``) is then what runs."""
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # none, or Lightning's "best"/"hpc"
        saved, recorded = read_checkpoint_settings(ckpt_path)
        if not saved:
            return
        current = self.config[sub]["model"].as_dict()
        merged, changed = merge_checkpoint_settings(current, self.explicit_model_settings(sub), saved, recorded,
                                                    ckpt_path)  # fmt: skip
        try:
            self.config = self.parser.parse_object({sub: {"model": merged}}, self.config)
        except ArgumentError as err:
            raise ConfigError(f"the settings saved in {ckpt_path} do not fit this version: "
                              + " ".join(str(err).split())) from err  # fmt: skip
        if changed:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            rank_zero_only(log.info)("settings that differ from %s take effect: %s", ckpt_path, listed)

    @staticmethod
    def set_purge_step(cfg) -> None:
        """A resumed run writes into the same TensorBoard run. Steps its previous process logged after the checkpoint
        (before a kill or requeue) are re-done now, so hide them with TensorBoard's ``purge_step`` (a SummaryWriter
        argument the TensorBoardLogger passes on; set here in its configuration unless given): every step then
        appears once in the curves."""
        ckpt_path = cfg.get("ckpt_path")
        dirs = logger_dirs(cfg["trainer"])
        if not ckpt_path or not Path(ckpt_path).is_file() or dirs is None:
            return
        writer_args = dirs[1]
        if "purge_step" in writer_args and writer_args["purge_step"] is None:  # a TensorBoard logger's
            writer_args["purge_step"] = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)[
                "global_step"
            ]

    def instantiate_trainer(self, **kwargs):
        """Adds the atomic checkpoint writer and, under SLURM, the auto-requeue environment to the plugins,
        ``StepBoundaryRequeue`` to the callbacks (preemption checkpoints at a step boundary) and, in place of
        Lightning's default progress bar, :func:`console_callbacks`'s."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = (config.get("trainer") or {}).get("plugins") or []
        plugins = list(configured) if isinstance(configured, list) else [configured]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        requeue = None
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            requeue = SLURMEnvironment(auto_requeue=True)
            plugins.append(requeue)
        callbacks = console_callbacks(config.get("trainer") or {})
        if callbacks is not None:
            kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        if requeue is not None:
            trainer.callbacks.append(StepBoundaryRequeue(requeue.requeue_signal))
        return trainer

    def instantiate_classes(self) -> None:
        """Constructor errors (bad model/data arguments) become one-line configuration errors: the constructor's own
        message, found at the root of the exception chain (jsonargparse wraps a subclass-typed argument's error)."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ImportError, MisconfigurationException) as err:
            cause = root_cause(err)
            missing = missing_extra_message(cause.name or "") if isinstance(cause, ModuleNotFoundError) else None
            raise ConfigError(missing or str(cause)) from err

    def after_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        check_model_matches_data(self.model, self.datamodule, checkpoint=ckpt_path, stage=sub)
        if sub is not None:
            self.check_writable(sub)

    def check_writable(self, sub: str) -> None:
        """Fail before any step when a directory the run writes to (logs and config.yaml, checkpoints, predicted
        samples) cannot be written, naming it and the setting that chooses it."""
        trainer = self.trainer
        dirs = [
            (lg.root_dir, "trainer.logger.init_args.save_dir")
            for lg in trainer.loggers
            if getattr(lg, "root_dir", None)
        ]
        dirs = dirs or [(trainer.default_root_dir, "trainer.default_root_dir")]
        dirs += [(cb.dirpath, "the ModelCheckpoint's dirpath") for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.dirpath]  # fmt: skip
        if sub == "predict":
            dirs += [
                (cb.output_dir, "predict_writer.output_dir") for cb in trainer.callbacks if isinstance(cb, SampleWriter)
            ]
        for directory, setting in dirs:
            problem = unwritable(Path(directory))
            if problem:
                raise ConfigError(f"cannot write to {directory}: {problem}; set {setting} to a writable directory or "
                                  "fix its permissions")  # fmt: skip


def console_callbacks(trainer_config: dict) -> list | None:
    """The configured (instantiated) trainer callbacks plus, where Lightning would add its ``RichProgressBar``, a
    :class:`~callbacks.console.StepLimitedRichProgressBar` ("Epoch 6", not "Epoch 6/-2", on step-limited runs).
    None: nothing to add (no progress bar, one configured, or ``rich`` missing, where Lightning uses tqdm)."""
    from lightning.pytorch.callbacks.progress import ProgressBar

    configured = trainer_config.get("callbacks") or []
    configured = list(configured) if isinstance(configured, list) else [configured]
    if trainer_config.get("enable_progress_bar") is False or importlib.util.find_spec("rich") is None:
        return None
    if any(isinstance(cb, ProgressBar) for cb in configured):
        return None
    from callbacks.console import StepLimitedRichProgressBar

    return [*configured, StepLimitedRichProgressBar()]


def root_cause(err: BaseException) -> BaseException:
    """The first exception of a chain (``__cause__``, else ``__context__``): the one the failing code raised; or the
    first ``DataError``, whose message is already the line for people (an unreadable shard: not the tar error that
    revealed it)."""
    while not isinstance(err, DataError) and (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def read_checkpoint_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(saved ``model`` hyper-parameters, backbone config recorded by ``on_save_checkpoint``) of a Lightning checkpoint,
    read without loading its tensors."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    for internal in ("_instantiator", "_class_path"):  # LightningCLI's bookkeeping
        hparams.pop(internal, None)
    return hparams, dict((ckpt.get("zigma") or {}).get("config") or {})


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so values from YAML, argparse and a checkpoint compare alike."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def architecture_conflicts(given: dict, saved: dict, recorded: dict) -> list[str]:
    """``"key=given (checkpoint: saved)"`` for every architecture setting given that differs from the checkpoint's."""
    built = saved_architecture(saved, recorded)
    found = []
    if given.get("preset") is not None and given["preset"] != saved.get("preset"):
        found.append(f"model.preset={given['preset']!r} (checkpoint: {saved.get('preset')!r})")
    if given.get("cond_dropout_prob") is not None and given["cond_dropout_prob"] != built["cond_dropout_prob"]:
        found.append(f"model.cond_dropout_prob={given['cond_dropout_prob']} (checkpoint: {built['cond_dropout_prob']})")
    for key, value in (given.get("net") or {}).items():
        if value is not None and key not in RUNTIME_NET_KEYS and _plain(value) != _plain(built.get(key)):
            found.append(f"model.net.{key}={value!r} (checkpoint: {built.get(key)!r})")
    return found


def merge_checkpoint_settings(current: dict, given: dict, saved: dict, recorded: dict,
                              ckpt_path: str | Path) -> tuple[dict, dict]:  # fmt: skip
    """The ``model`` settings to run with, from the parsed ones (``current``: defaults, configs, command line), those
    given explicitly (``given``) and the checkpoint's (``saved``, ``recorded``): the architecture is the checkpoint's
    (a conflicting given value raises :class:`ConfigError`), ``net``'s runtime keys and every other setting given
    win, the saved values fill in the rest. Returns (settings, {key: (saved, now)} for what differs from the saved)."""
    try:
        conflicts = architecture_conflicts(given, saved, recorded)
    except ValueError as err:  # e.g. a preset this version does not have
        raise ConfigError(f"the architecture saved in {ckpt_path} does not fit this version: {err}") from err
    if conflicts:
        run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
        hint = f" (its run's settings: {run_config})" if run_config.is_file() else ""
        raise ConfigError(f"{', '.join(conflicts)}: the checkpoint {ckpt_path} fixes the architecture{hint}; leave "
                          "these settings out or give the checkpoint's values")  # fmt: skip
    merged = {}
    for key, value in saved.items():
        if key not in current:
            continue  # a setting this version no longer has
        if key == "net":
            runtime = {k: v for k, v in (given.get("net") or {}).items() if k in RUNTIME_NET_KEYS and v is not None}
            merged[key] = {**(value or {}), **runtime}
        elif key in ARCHITECTURE_SETTINGS or key not in given:
            merged[key] = value
    before = {**{f"net.{k}": v for k, v in (saved.get("net") or {}).items()}, **saved}
    after = {**{f"net.{k}": merged["net"].get(k) for k in RUNTIME_NET_KEYS if "net" in merged}, **current}
    changed = {
        key: (before.get(key), after[key])
        for key in [*given, *(f"net.{k}" for k in (given.get("net") or {}) if k in RUNTIME_NET_KEYS)]
        if key in after and key not in ARCHITECTURE_SETTINGS and _plain(before.get(key)) != _plain(after[key])
    }
    return merged, changed


def unwritable(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (made later by the run, so its nearest existing ancestor is
    tried), or None. Tries a temporary file: permission bits alone say nothing for root or read-only mounts."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{err.strerror or err} ({existing})"
    return None


def check_model_matches_data(model: FlowMatchingModule, data: ZigMaDataModule | None,
                             checkpoint: str | None = None, stage: str | None = None) -> None:  # fmt: skip
    """Fail before any step when the model cannot consume what the data yields (``FlowMatchingModule.check_data``
    against ``ZigMaDataModule.yields``) or differs from the shards' manifest (``ZigMaDataModule.check_manifest``).
    ``stage`` (the subcommand): ``predict`` reads no data, so shard DataModules need no shards for it."""
    if data is None:
        return
    try:
        yields = data.yields(stage)
        model.check_data(yields, checkpoint=checkpoint)
        data.check_manifest(**model.manifest_facts())
        model.check_latent_scale(yields.vae_scale)  # after the manifest check, whose message names more
    except ValueError as err:
        raise ConfigError(str(err)) from err


def main(args: list[str] | None = None) -> ZigMaCLI | None:
    """Run a LightningCLI subcommand (``args`` as on the command line; None: ``sys.argv[1:]``). Configuration
    errors exit with status 2 and one line, a run stopped by its disk or data with status 1 (``ZIGMA_DEBUG=1``
    raises instead, for the traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ZigMaCLI(
            FlowMatchingModule,
            ZigMaDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": DEFAULT_LOGGER, "log_every_n_steps": 10},
            args=args,
        )
    except ConfigError as err:  # raised only while parsing/instantiating; errors during a run keep their traceback
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ArgumentError as err:  # LightningCLI's own parse of a checkpoint's saved hyper-parameters
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print("error: the settings saved in the checkpoint do not fit this version: " + " ".join(str(err).split()),
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    except (CheckpointWriteError, DataError) as err:  # a run stopped by its disk (full during a save: the last good
        # checkpoint is kept) or by its data (more damaged samples than data.max_bad_samples): one line, exit 1
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
