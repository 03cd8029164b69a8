"""ZigMa command line: ``python cli.py fit|validate|test|predict --config configs/...yaml [--key value ...]``.

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

import difflib
import inspect
import logging
import os
import re
import sys
import tempfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from callbacks import SampleWriter
from callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, CorruptCheckpointError, verify_checkpoint
from callbacks.evaluation import FIDEvaluation, FVDEvaluation
from callbacks.slurm import StepBoundaryRequeue
from datamodules import ZigMaDataModule
from datamodules.errors import DataError
from zigma.flow_module import ARCHITECTURE_SETTINGS, RUNTIME_NET_KEYS, FlowMatchingModule, saved_architecture

log = logging.getLogger("zigma.cli")

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "zigma"},
}


class ConfigError(ValueError):
    """A configuration that cannot work; reported in one line naming the key."""


def _loads(path: Path) -> bool:
    """Whether ``path`` is an intact Lightning checkpoint: every byte matches its recorded CRC-32, it loads with
    weights_only=True and has a step (``callbacks.checkpoint_io.verify_checkpoint``). Logs one line if not."""
    try:
        ckpt = verify_checkpoint(path)
    except (CorruptCheckpointError, OSError) as err:
        log.warning("skipping %s checkpoint %s: %s", _damage(err), path, err)
        return False
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt):
        log.warning("skipping %s: not a Lightning checkpoint (no state_dict or global_step)", path)
        return False
    return True


def find_resume_checkpoint(run_root: Path) -> Path | None:
    """Newest intact checkpoint of the runs under ``run_root`` (see ``_loads``), by modification time.

    Candidates: ``<run>/checkpoints/*.ckpt`` (step checkpoints and ``last.ckpt``) and ``<run>/hpc_ckpt_*.ckpt``
    (SLURM preemption), for every run directory under ``run_root``, plus ``run_root`` itself as a run directory.
    """
    patterns = ("*/checkpoints/*.ckpt", "*/hpc_ckpt_*.ckpt", "checkpoints/*.ckpt", "hpc_ckpt_*.ckpt")
    candidates = {p for pattern in patterns for p in run_root.glob(pattern) if p.is_file()}
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if _loads(path):
            return path
    return None


def check_checkpoint_path(ckpt_path: str) -> None:
    """An explicit ``--ckpt_path`` must exist and be intact (``verify_checkpoint``), or a one-line ConfigError."""
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: file not found (or use 'last' to resume the newest run)")
    try:
        verify_checkpoint(ckpt_path)
    except (CorruptCheckpointError, OSError) as err:
        raise ConfigError(f"ckpt_path={ckpt_path!r}: {_damage(err)} checkpoint: {err}; --ckpt_path last resumes from "
                          "the newest intact one") from err  # fmt: skip


def _damage(err: Exception) -> str:
    return "corrupt" if isinstance(err, CorruptCheckpointError) else "unreadable"


def slurm_job_tag() -> str | None:
    """A run-directory name stable across requeues of one SLURM job (array jobs: job_task), or None off SLURM."""
    if not SLURMEnvironment.detect():
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
    return f"slurm_{job}"


def _logger_dirs(trainer_cfg: Any) -> tuple[Path, Any] | None:
    """(save_dir/name, init_args namespace) of a configured TensorBoard/CSV logger, or None."""
    logger = trainer_cfg.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if not logger or logger is True or not hasattr(logger, "get") or logger.get("init_args") is None:
        return None
    args = logger["init_args"]
    save_dir = args.get("save_dir") or "."
    name = args.get("name") or ""
    return Path(save_dir) / name, args


class ZigMaCLI(LightningCLI):
    def init_parser(self, **kwargs):
        """Parsers raise instead of printing the usage and exiting, so :meth:`parse_arguments` can report one line."""
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SampleWriter, "predict_writer")
        # FID/FVD at the end of each validation (fit, validate) and test; off until fid.num_samples / fvd.num_samples
        parser.add_lightning_class_args(FIDEvaluation, "fid")
        parser.add_lightning_class_args(FVDEvaluation, "fvd")
        self._parsers = [*getattr(self, "_parsers", []), parser]  # one per subcommand, for "did you mean" hints

    def parse_arguments(self, parser, args) -> None:
        """Parse, keeping the arguments (:meth:`_explicit_model_settings` reads them again without defaults); a parse
        error becomes one line, with a "did you mean" for a mistyped key."""
        self._args = args
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            defaults = [p.get_defaults() for p in getattr(self, "_parsers", [])]
            known = {key for d in defaults for key in d.keys()}  # noqa: SIM118 (a Namespace's keys() are dotted)
            raise ConfigError(describe_parse_error(str(err), known)) from err

    def _parse_ckpt_path(self) -> None:
        """Disabled on purpose. LightningCLI calls this private hook right after parsing, and its version replaces
        every ``model.*`` value (the command line's and the configs' too) with the hyper-parameters saved in the
        checkpoint. :meth:`_apply_checkpoint_settings` (from ``before_instantiate_classes``) applies our precedence
        instead: the checkpoint fixes the architecture, everything else given takes effect."""

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        if sub != "fit" and not cfg.get("ckpt_path"):
            raise ConfigError(
                f"{sub} needs --ckpt_path (a checkpoint file, or 'last' for the newest run): without one it would "
                "use the untrained network's random weights"
            )
        if sub == "fit":
            self._setup_slurm_run(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            self._resolve_last(sub, cfg)
        elif ckpt_path and ckpt_path not in ("best", "hpc"):
            check_checkpoint_path(ckpt_path)
        self._apply_checkpoint_settings(sub)

    def _explicit_model_settings(self, sub: str) -> dict[str, Any]:
        """The ``model`` settings the configs and the command line give, without the parser's defaults."""
        parse = self.parser.parse_object if hasattr(self._args, "items") else self.parser.parse_args
        given = parse(self._args, defaults=False).get(f"{sub}.model")
        return given.as_dict() if given is not None else {}

    def _apply_checkpoint_settings(self, sub: str) -> None:
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
        merged, changed = merge_checkpoint_settings(current, self._explicit_model_settings(sub), saved, recorded,
                                                    ckpt_path)  # fmt: skip
        try:
            self.config = self.parser.parse_object({sub: {"model": merged}}, self.config)
        except ArgumentError as err:
            line = describe_parse_error(str(err), set())
            raise ConfigError(f"the settings saved in {ckpt_path} do not fit this version: {line}") from err
        if changed:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            rank_zero_only(log.info)("settings that differ from %s take effect: %s", ckpt_path, listed)

    def _setup_slurm_run(self, cfg) -> None:
        """Under SLURM: one run directory per job (stable across requeues) holding its hpc checkpoints, and a requeued
        job resumes from the newest good checkpoint of its own run (Lightning's ``ckpt_path="last"`` would ignore
        ``hpc_ckpt_*``). A new job starts a new run unless ``--ckpt_path last`` (newest run) or a path is given."""
        tag = slurm_job_tag()
        if tag is None:
            return
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
        devices, nodes = cfg["trainer"].get("devices"), cfg["trainer"].get("num_nodes") or 1
        if isinstance(devices, int) and devices * nodes != ntasks:
            raise ConfigError(
                f"trainer.devices={devices} x trainer.num_nodes={nodes} != SLURM_NTASKS={ntasks}: set "
                "--ntasks-per-node to trainer.devices and --nodes to trainer.num_nodes"
            )
        dirs = _logger_dirs(cfg["trainer"])
        if dirs is not None:
            if dirs[1].get("version") is None:
                dirs[1]["version"] = tag
            run_dir = dirs[0] / str(dirs[1]["version"])
        else:
            run_dir = Path(cfg["trainer"].get("default_root_dir") or ".") / tag
        if not cfg["trainer"].get("default_root_dir"):
            cfg["trainer"]["default_root_dir"] = str(run_dir)  # where Lightning writes hpc_ckpt_<n>.ckpt
        if cfg.get("ckpt_path") is None:
            found = find_resume_checkpoint(run_dir)
            if found is not None:
                log.info("SLURM job %s resumes from %s", tag, found)
                cfg["ckpt_path"] = str(found)

    def instantiate_trainer(self, **kwargs):
        """Adds the atomic checkpoint writer and, under SLURM, the auto-requeue environment to the plugins and
        ``StepBoundaryRequeue`` to the callbacks (preemption checkpoints at a step boundary)."""
        configured = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(configured) if isinstance(configured, list) else [configured]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        requeue = None
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            requeue = SLURMEnvironment(auto_requeue=True)
            plugins.append(requeue)
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        if requeue is not None:
            trainer.callbacks.append(StepBoundaryRequeue(requeue.requeue_signal))
        return trainer

    def _resolve_last(self, sub: str, cfg) -> None:
        dirs = _logger_dirs(cfg["trainer"])
        root = dirs[0] if dirs else Path(cfg["trainer"].get("default_root_dir") or ".")
        found = find_resume_checkpoint(root)
        if found is None and sub != "fit":  # never predict or evaluate with random weights
            raise ConfigError(f"ckpt_path=last: no readable checkpoint under {root} to {sub} with; train first "
                              "(python cli.py fit ...) or pass a checkpoint file")  # fmt: skip
        if found is None:
            log.warning("ckpt_path=last: no readable checkpoint under %s; starting from scratch", root)
            cfg["ckpt_path"] = None
            return
        cfg["ckpt_path"] = str(found)
        run_dir = found.parent.parent if found.parent.name == "checkpoints" else found.parent
        if dirs and run_dir != root:
            dirs[1]["version"] = run_dir.name  # continue the same TensorBoard run
            if cfg["trainer"].get("default_root_dir") and slurm_job_tag():
                cfg["trainer"]["default_root_dir"] = str(run_dir)
        log.info("ckpt_path=last -> %s", found)

    def instantiate_classes(self) -> None:
        """Constructor errors (bad model/data arguments) become one-line configuration errors."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ImportError, MisconfigurationException) as err:
            raise ConfigError(_first_useful_line(str(err))) from err

    def after_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        check_model_matches_data(self.model, self.datamodule, checkpoint=ckpt_path)
        if sub is not None:
            self._check_writable(sub)

    def _check_writable(self, sub: str) -> None:
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

    def before_fit(self) -> None:
        """A resumed run writes into the same TensorBoard run. Steps its previous process logged after the checkpoint
        (before a kill or requeue) are re-done now, so hide them with TensorBoard's ``purge_step``: every step then
        appears once in the curves. (TensorBoardLogger passes extra kwargs to its SummaryWriter, created lazily.)"""
        ckpt_path = self.config["fit"].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        for logger in self.trainer.loggers:
            if not isinstance(logger, TensorBoardLogger) or logger._experiment is not None:
                continue
            if logger._kwargs.get("purge_step") is None:  # the CLI fills the writer's defaults, so it is present
                logger._kwargs["purge_step"] = step


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


def describe_parse_error(message: str, known_keys: set[str]) -> str:
    """One line for a jsonargparse error. A mistyped option gets a suggestion computed with difflib from what is
    accepted there: the parser's keys for ``--a.b`` flags, the class's parameters for a key inside a typed value."""
    if message.startswith("unrecognized arguments:"):
        flags = [tok for tok in message.split(":", 1)[1].split() if tok.startswith("--")]
        names = [flag[2:].split("=")[0] for flag in flags] or [message.split(":", 1)[1].strip()]
        close = _closest_key(names[0], known_keys)
        hint = f"; did you mean --{close}?" if close else " (see --help for the options)"
        return f"unknown option --{names[0]}{hint}"
    parser_key = re.match(r'Parser key "([^"]+)"', message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    class_path = re.search(r"class_path '([^']+)'", message)
    if parser_key and option and class_path:
        accepted = _parameters_of(class_path.group(1))
        close = difflib.get_close_matches(option.group(1), accepted, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (accepted: {', '.join(accepted)})"
        return f"unknown key {option.group(1)!r} in {parser_key.group(1)} ({class_path.group(1)}){hint}"
    return _first_useful_line(message)


def _closest_key(key: str, known_keys: set[str]) -> str | None:
    """The known key closest to ``key``: among its siblings (same parent) when the parent is known, else any."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known_keys if k.rpartition(".")[0] == parent} if parent else {}
    if siblings:
        close = difflib.get_close_matches(leaf, list(siblings), n=1)
        return siblings[close[0]] if close else None
    close = difflib.get_close_matches(key, sorted(known_keys), n=1)
    return close[0] if close else None


def _parameters_of(class_path: str) -> list[str]:
    """Keyword parameters of a class (a dataclass's fields) named by its import path; [] if it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _first_useful_line(message: str) -> str:
    """The informative line of an error. jsonargparse reports a value that fits none of a Union's types (a bad
    value, or the constructor error of a subclass-typed argument such as the DataModule) as a multi-line
    "Does not validate against any of the Union subtypes" report: its "  - " items hold the reasons."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid configuration"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    for i, line in enumerate(lines):
        if line.startswith("- Problem with given class_path") and i + 1 < len(lines):  # the class's own error
            return f"{line[2:]} {lines[i + 1]}" if key else lines[i + 1]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    subtypes = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Subtypes:")), None)
    if key and given is not None and subtypes is not None:
        literals = re.findall(r"Literal\[([^\]]*)\]", subtypes)
        accepted = ", ".join(literals) + (", null" if "NoneType" in subtypes else "") if literals else subtypes
        return f"{key.group(1)}={given} is not accepted; expected one of {accepted}"
    items = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    if items:
        return items[0]
    if key:
        return f"{key.group(1)}: {key.group(2) or (lines[1] if len(lines) > 1 else 'invalid value')}"
    return lines[0]


def check_model_matches_data(model: FlowMatchingModule, data: ZigMaDataModule | None,
                             checkpoint: str | None = None) -> None:  # fmt: skip
    """Fail before training when the backbone cannot consume the data's samples or conditions. With a
    ``checkpoint`` the architecture is its own, so the advice is to use matching data rather than to change it."""
    if data is None:
        return

    def advice(fix: str = "") -> str:
        if checkpoint is not None:
            return f"; the checkpoint {checkpoint} fixes the architecture: use data that fits it"
        return f"; {fix}" if fix else ""

    net = model.model
    want = tuple(getattr(data, "sample_shape", ()) or ())
    pixel_shape = getattr(data, "pixel_shape", None)
    if pixel_shape is not None and not want:  # images that the module encodes with its VAE
        if model.vae is None:
            raise ConfigError(f"the data yields pixels of shape {tuple(pixel_shape)} to encode: set model.vae "
                              "(a diffusers AutoencoderKL directory or hub id)")  # fmt: skip
        factor = model.vae.downsample_factor
        latent = (model.vae.latent_channels, pixel_shape[-2] // factor, pixel_shape[-1] // factor)
        want = (pixel_shape[0], *latent) if len(pixel_shape) == 4 else latent  # video frames (T, 3, S, S)
    if want and len(want) != len(model.sample_shape):
        kind = "video clips (T, C, H, W)" if len(want) == 4 else "images (C, H, W)"
        frames = want[0] if len(want) == 4 else 0
        raise ConfigError(f"model.net.video_frames={net.video_frames} does not match the data: "
                          f"{type(data).__name__} yields {kind} of shape {want}"
                          + advice(f"set model.net.video_frames={frames}"))  # fmt: skip
    if want and tuple(model.sample_shape) != want:
        names = ("video_frames", "in_channels", "img_dim", "img_dim")[-len(want) :]
        have = dict(zip(names, model.sample_shape))
        expected = dict(zip(names, want))
        key = next(k for k in names if have[k] != expected[k])
        raise ConfigError(f"model.net.{key}={have[key]} does not match the data: {type(data).__name__} yields samples "
                          f"of shape {want}" + advice(f"set model.net.{key}={expected[key]}"))  # fmt: skip
    if data.num_classes > 0 and net.num_classes != data.num_classes:
        raise ConfigError(f"model.net.num_classes={net.num_classes} but the data has {data.num_classes} classes"
                          + advice())  # fmt: skip
    if net.num_classes > 0 and data.num_classes == 0:
        raise ConfigError(f"model.net.num_classes={net.num_classes} but {type(data).__name__} has no class labels"
                          + advice("set model.net.num_classes=-1"))  # fmt: skip
    if data.context_dim > 0 and not net.has_text:
        raise ConfigError("the data carries caption features" + advice("set model.net.has_text=true and "
                                                                        "model.net.d_context"))  # fmt: skip
    if net.has_text and data.context_dim == 0:
        raise ConfigError("model.net.has_text=true but the data has no caption features (data.caption_key)" + advice())
    if net.has_text and net.config["d_context"] != data.context_dim:
        raise ConfigError(f"model.net.d_context={net.config['d_context']} but captions have width {data.context_dim}"
                          + advice())  # fmt: skip
    check_manifest_matches(model, getattr(data, "shards", None))


def check_manifest_matches(model: FlowMatchingModule, shards) -> None:
    """Shards made by ``datamodules.prepare`` carry a manifest: reject a model whose sample shape, VAE scaling,
    classes or caption width differ from it (shards without a manifest, e.g. upstream's, are not checked)."""
    if not shards:
        return
    from datamodules.manifest import check_manifest, read_manifest

    try:
        manifest = read_manifest(shards)
    except FileNotFoundError:
        return
    net = model.model
    try:
        check_manifest(
            manifest,
            sample_shape=model.sample_shape,
            vae_config=model.vae.config() if model.vae is not None else None,
            num_classes=net.num_classes if net.num_classes > 0 else None,
            context_dim=net.config["d_context"] if net.has_text else None,
            ignore_vae_keys=("name_or_path", "subfolder"),  # the same VAE may live elsewhere on this machine
        )
    except ValueError as err:
        raise ConfigError(f"the model does not match the data's manifest: {err}") from err


def main(args: list[str] | None = None) -> ZigMaCLI | None:
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
    except (CheckpointWriteError, DataError) as err:  # a run stopped by its disk (full during a save: the last good
        # checkpoint is kept) or by its data (more damaged samples than data.max_bad_samples): one line, exit 1
        if os.environ.get("ZIGMA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
