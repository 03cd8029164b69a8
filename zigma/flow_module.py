"""The one LightningModule: flow matching (SiT stochastic interpolants) around the ZigMa backbone.

It owns the backbone (``model``), its EMA copy (``ema``), the transport and sampler, and the optimizer/LR schedule.
Batches are dicts ``{"x": data, "y": condition (optional)}`` (see ``datamodules.base``); ``predict`` batches are
``{"index": sample ids, "y": labels (optional)}``. All sampling and evaluation uses the EMA weights.

Why not Lightning's ``EMAWeightAveraging``: it deep-copies the whole LightningModule (any frozen VAE/metric network
attached to it), swaps the averaged weights into the live model for all of validation (so a checkpoint written then
would hold swapped weights) and has no warm-up. Our EMA is a frozen copy of the backbone only (``zigma.ema``), updated
after each optimizer step; nothing is ever swapped.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn

from zigma.ema import EMA
from zigma.flops import training_flops_per_sample
from zigma.model import ZigMa
from zigma.presets import PRESETS
from zigma.sampling import Sampler, SampleResult, classifier_free_guidance
from zigma.transport import create_transport

LrSchedule = Literal["constant", "cosine"]
SampleMode = Literal["ode", "sde"]

# parameters never decayed (besides every tensor with < 2 dims: biases, norm weights, D, dt bias)
_NO_DECAY_NAMES = ("pos_embed", "temporal_pos_embedding", "embedding_table", "null_embedding")


def _zigma_arguments_dataclass():
    """A keyword-only dataclass mirroring ``ZigMa.__init__`` (every field optional, None = not given).

    Typing ``net`` with it lets LightningCLI merge ``model.net`` across config files key by key, list the keys in
    ``--help`` and reject unknown ones; it is generated so the signature is spelled once, in ``ZigMa``.
    """
    hints = typing.get_type_hints(ZigMa.__init__)
    fields = [
        (name, hints[name] | None, dataclasses.field(default=None))
        for name in inspect.signature(ZigMa.__init__).parameters
        if name not in ("self", "device", "dtype")
    ]
    cls = dataclasses.make_dataclass("ZigMaArgs", fields, kw_only=True)
    cls.__module__ = __name__  # importable as zigma.flow_module.ZigMaArgs (jsonargparse resolves it by path)
    return cls


ZigMaArgs = _zigma_arguments_dataclass()


def _given(net: Any) -> dict[str, Any]:
    """ZigMaArgs or a plain dict (e.g. a checkpoint's saved ``net``) -> dict of the arguments given (not None)."""
    items = dataclasses.asdict(net).items() if dataclasses.is_dataclass(net) else (net or {}).items()
    return {k: v for k, v in items if v is not None}


# The module's settings that define the backbone's weights: a checkpoint fixes them (see ``cli.py``).
ARCHITECTURE_SETTINGS = ("net", "preset", "cond_dropout_prob")
# ZigMa arguments that only change how the backbone runs or trains, not its weights: free to differ from a checkpoint.
RUNTIME_NET_KEYS = frozenset({"scan_backend", "drop_path_rate", "use_checkpoint", "use_jit"})


def backbone_arguments(net: dict[str, Any] | None, preset: str | None, cond_dropout_prob: float | None) -> dict:
    """ZigMa's keyword arguments from a preset and/or explicit arguments; conditional models default to 10% condition
    dropout (CFG)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is not one of {sorted(PRESETS)}")
    kwargs = {**(PRESETS[preset] if preset else {}), **_given(net)}
    if not kwargs:
        raise ValueError("model.net (ZigMa arguments) or model.preset must be given")
    conditional = kwargs.get("has_text", False) or kwargs.get("num_classes", -1) > 0
    if cond_dropout_prob is None:  # explicit values are validated by ZigMa (and unused by unconditional models)
        cond_dropout_prob = kwargs.get("cond_dropout_prob", 0.1 if conditional else 0.0)
    kwargs["cond_dropout_prob"] = cond_dropout_prob
    return kwargs


def build_backbone(net: dict[str, Any] | None, preset: str | None, cond_dropout_prob: float | None) -> ZigMa:
    """ZigMa from :func:`backbone_arguments`."""
    return ZigMa(**backbone_arguments(net, preset, cond_dropout_prob))


def saved_architecture(hparams: dict[str, Any], recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ZigMa argument a checkpoint's backbone was built with: the signature's defaults, overridden by what the
    saved hyper-parameters (``net``, ``preset``, ``cond_dropout_prob``) give, overridden by the config recorded by
    ``on_save_checkpoint`` (``checkpoint["zigma"]["config"]``)."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(ZigMa.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    given = backbone_arguments(hparams.get("net"), hparams.get("preset"), hparams.get("cond_dropout_prob"))
    return {**defaults, **given, **(recorded or {})}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for A_log, D, norms, biases, embeddings and positional tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False) or any(k in name for k in _NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then 1 (constant) or a cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class FlowMatchingModule(L.LightningModule):
    """Flow-matching training of ZigMa.

    Args:
        net: ZigMa constructor arguments (override ``preset``'s).
        preset: a name from ``zigma.PRESETS`` (e.g. ``zigzag8_b1_pe2``).
        path_type, prediction, loss_weight, train_eps, sample_eps: the transport (``zigma.transport``).
        time_distribution, logit_normal_mean, logit_normal_std: how training times are drawn: ``uniform`` (SiT) or
            ``logit_normal`` (SD3: t = sigmoid(m + s n), more training at mid noise levels).
        lr, weight_decay, betas, adam_eps: AdamW (parameter groups: no decay on A_log, D, norms, biases, embeddings).
        warmup_steps, lr_schedule, min_lr_ratio: linear warm-up, then constant or cosine to ``min_lr_ratio``·lr over
            the run's optimizer steps.
        ema_decay, ema_warmup, ema_update_every, ema_start_step: the EMA (``zigma.ema``).
        cond_dropout_prob: label/caption dropout for classifier-free guidance (default 0.1 for conditional models).
        allow_tf32: TF32 matmuls/convolutions on Ampere+ GPUs.
        sample_mode, sample_method, sample_steps, guidance_scale, sample_seed, atol, rtol, diffusion_form,
            diffusion_norm, last_step, last_step_size: how ``generate``/``predict`` sample (ODE via torchdiffeq or SDE).
        val_seed: seed of the fixed (noise, t) draws of the validation loss.
        step_seed: reseed the global RNG at every step from (step_seed, step, micro-batch, rank) so resumed runs are
            exact; None leaves the RNG alone.
        max_nonfinite_steps: a non-finite loss or gradient skips the update (counted in ``train/nonfinite_skipped``);
            this many in a row stop training with an error.
        vae, vae_subfolder, vae_scale, vae_dtype, vae_local_files_only: a frozen diffusers AutoencoderKL (local
            directory or hub id) for latent diffusion: ``"pixels"`` batches are encoded with it and samples decoded.
            It is loaded in ``setup`` and kept outside the module tree (no EMA copy, no optimizer state, not saved).
            ``vae_scale`` None: the VAE config's ``scaling_factor`` (``SD_LATENT_SCALE`` for the SD VAEs), which is
            also what ``prepare`` records in a manifest and the DataModules then apply (:meth:`check_latent_scale`).
    """

    def __init__(
        self,
        net: ZigMaArgs | None = None,  # a plain dict works too (Python API, checkpoint hparams)
        preset: str | None = None,
        path_type: str = "Linear",
        prediction: str = "velocity",
        loss_weight: str | None = None,
        train_eps: float | None = None,
        sample_eps: float | None = None,
        time_distribution: str = "uniform",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_schedule: LrSchedule = "constant",
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        ema_update_every: int = 1,
        ema_start_step: int = 0,
        cond_dropout_prob: float | None = None,
        allow_tf32: bool = True,
        sample_mode: SampleMode = "ode",
        sample_method: str = "euler",
        sample_steps: int = 50,
        guidance_scale: float = 1.0,
        sample_seed: int = 0,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        val_seed: int = 1234,
        step_seed: int | None = 0,
        max_nonfinite_steps: int = 10,
        vae: str | None = None,
        vae_subfolder: str | None = None,
        vae_scale: float | None = None,
        vae_dtype: str = "float32",
        vae_local_files_only: bool = True,
    ):
        super().__init__()
        net = _given(net)  # plain types in the checkpoint's hyper-parameters
        self.save_hyperparameters()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0; got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0; got {warmup_steps}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"model.lr_schedule must be 'constant' or 'cosine'; got {lr_schedule!r}")
        if sample_mode not in ("ode", "sde"):
            raise ValueError(f"model.sample_mode must be 'ode' or 'sde'; got {sample_mode!r}")
        self.model = build_backbone(net, preset, cond_dropout_prob)
        self.ema = EMA(self.model, ema_decay, ema_warmup, ema_update_every, ema_start_step)
        self.transport = create_transport(path_type, prediction, loss_weight, train_eps, sample_eps,
                                          time_distribution, logit_normal_mean, logit_normal_std)  # fmt: skip
        self.sampler = Sampler(self.transport)
        self._sample_fn = self._make_sampler(sample_mode, sample_method, sample_steps)  # validates the names now
        if guidance_scale != 1.0 and not self.model.has_null_condition:
            raise ValueError(
                f"model.guidance_scale={guidance_scale} needs a conditional model trained with condition dropout "
                "(model.cond_dropout_prob > 0); use guidance_scale 1.0"
            )
        self._flops_per_sample = training_flops_per_sample(self.model)
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps must be >= 1; got {max_nonfinite_steps}")
        self._step_skipped = False
        self._nonfinite_streak = 0
        self._nonfinite_total = 0
        self._vae = None  # zigma.vae.FrozenVAE, loaded in setup (not an nn.Module, so never a submodule)

    # ------------------------------------------------------------------------------------------------- summary
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's prediction (velocity by default) for x (B, *sample_shape) at t (B,); y: the condition."""
        return self.model(x, t, y)

    @property
    def example_input_array(self) -> dict[str, torch.Tensor] | None:
        """One zero sample at t = 0.5 (and class 0 / a zero caption for conditional models), so Lightning's model
        summary runs one forward and reports its FLOPs and tensor sizes instead of "Total FLOPs: 0". The count is
        torch's ``FlopCounterMode``: matrix products and convolutions of one sample's forward; the selective scan
        is not counted (``zigma.flops`` has the analytic count). None once a network is compiled
        (``PerformanceSwitches``), so the summary does not trigger a compilation for a batch of one."""
        if any(getattr(n, "_compiled_call_impl", None) is not None for n in (self.model, self.ema.network)):
            return None
        m = self.model
        example = {"x": torch.zeros(1, *self.sample_shape), "t": torch.full((1,), 0.5)}
        if m.has_text:
            example["y"] = torch.zeros(1, max(1, m.config["n_context_token"]), m.config["d_context"])
        elif m.num_classes > 0:
            example["y"] = torch.zeros(1, dtype=torch.long)
        return example

    @example_input_array.setter
    def example_input_array(self, value) -> None:  # LightningModule.__init__ assigns None
        pass

    # ----------------------------------------------------------------------------------------------------- sampling
    def _make_sampler(self, mode: str, method: str, steps: int):
        hp = self.hparams
        if mode == "sde":
            return self.sampler.sample_sde(method=method, diffusion_form=hp.diffusion_form,
                                           diffusion_norm=hp.diffusion_norm, last_step=hp.last_step,
                                           last_step_size=hp.last_step_size, num_steps=steps)  # fmt: skip
        return self.sampler.sample_ode(method=method, num_steps=steps, atol=hp.atol, rtol=hp.rtol)

    def noise(self, indices: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Starting noise (B, *sample_shape) for global sample ``indices``: sample i is the same whatever the batch."""
        seed = self.hparams.sample_seed if seed is None else seed
        shape = self.sample_shape
        draws = [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in indices
        ]
        return torch.stack(draws).to(self.device)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        m = self.model
        frame = (m.in_channels, m.img_dim, m.img_dim)
        return (m.video_frames, *frame) if m.video_frames > 0 else frame

    def check_data(self, data, checkpoint: str | None = None) -> None:
        """Raise ValueError (one line naming the ``model.net`` key) when the backbone cannot consume what a DataModule
        yields (``data``: ``datamodules.base.DataYields``: sample or pixel shape, classes, caption width). With a
        ``checkpoint`` the architecture is its own, so the advice is to use matching data rather than to change it."""

        def advice(fix: str = "") -> str:
            if checkpoint is not None:
                return f"; the checkpoint {checkpoint} fixes the architecture: use data that fits it"
            return f"; {fix}" if fix else ""

        net, want = self.model, tuple(data.sample_shape)
        if data.pixel_shape is not None and not want:  # images that the module encodes with its VAE
            if self.vae is None:
                raise ValueError(f"the data yields pixels of shape {tuple(data.pixel_shape)} to encode: set model.vae "
                                 "(a diffusers AutoencoderKL directory or hub id)")  # fmt: skip
            factor, pixels = self.vae.downsample_factor, data.pixel_shape
            latent = (self.vae.latent_channels, pixels[-2] // factor, pixels[-1] // factor)
            want = (pixels[0], *latent) if len(pixels) == 4 else latent  # video frames (T, 3, S, S)
        if want and len(want) != len(self.sample_shape):
            kind = "video clips (T, C, H, W)" if len(want) == 4 else "images (C, H, W)"
            frames = want[0] if len(want) == 4 else 0
            fix = advice(f"set model.net.video_frames={frames}")
            raise ValueError(f"model.net.video_frames={net.video_frames} does not match the data: {data.source} "
                             f"yields {kind} of shape {want}{fix}")  # fmt: skip
        if want and tuple(self.sample_shape) != want:
            names = ("video_frames", "in_channels", "img_dim", "img_dim")[-len(want) :]
            have, expected = dict(zip(names, self.sample_shape)), dict(zip(names, want))
            key = next(k for k in names if have[k] != expected[k])
            raise ValueError(f"model.net.{key}={have[key]} does not match the data: {data.source} yields samples of "
                             f"shape {want}" + advice(f"set model.net.{key}={expected[key]}"))  # fmt: skip
        if data.num_classes > 0 and net.num_classes != data.num_classes:
            raise ValueError(f"model.net.num_classes={net.num_classes} but the data has {data.num_classes} classes"
                             + advice())  # fmt: skip
        if net.num_classes > 0 and data.num_classes == 0:
            raise ValueError(f"model.net.num_classes={net.num_classes} but {data.source} has no class labels"
                             + advice("set model.net.num_classes=-1"))  # fmt: skip
        if data.context_dim > 0 and not net.has_text:
            raise ValueError("the data carries caption features"
                             + advice("set model.net.has_text=true and model.net.d_context"))  # fmt: skip
        if net.has_text and data.context_dim == 0:
            raise ValueError("model.net.has_text=true but the data has no caption features (data.caption_key)"
                             + advice())  # fmt: skip
        if net.has_text and net.config["d_context"] != data.context_dim:
            raise ValueError(f"model.net.d_context={net.config['d_context']} but captions have width "
                             f"{data.context_dim}" + advice())  # fmt: skip

    def manifest_facts(self) -> dict:
        """What a dataset manifest (``datamodules.manifest.check_manifest``) is compared with: the sample shape, the
        VAE's config, the number of classes and the caption width (None where the model has none)."""
        net = self.model
        return {
            "sample_shape": self.sample_shape,
            "vae_config": self.vae.config() if self.vae is not None else None,
            "num_classes": net.num_classes if net.num_classes > 0 else None,
            "context_dim": net.config["d_context"] if net.has_text else None,
        }

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, y: torch.Tensor | None = None, *, mode: str | None = None,
                 method: str | None = None, num_steps: int | None = None,
                 guidance_scale: float | None = None) -> SampleResult:  # fmt: skip
        """Sample from noise ``x0`` with the EMA weights (defaults from the hyper-parameters)."""
        hp = self.hparams
        if mode is None and method is None and num_steps is None:
            sample = self._sample_fn
        else:
            sample = self._make_sampler(
                mode or hp.sample_mode, method or hp.sample_method, num_steps or hp.sample_steps
            )
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        model_fn = self.ema  # runs the average in eval mode
        if self.model.is_conditional:
            model_fn = classifier_free_guidance(model_fn, scale)
        cond = {"y": y} if y is not None else {}
        return sample(x0, model_fn, **cond)

    # ----------------------------------------------------------------------------------------------------- training
    @staticmethod
    def _condition(batch: dict) -> dict:
        return {"y": batch["y"]} if batch.get("y") is not None else {}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.flops_per_batch = self._flops_per_sample * (batch["x"] if "x" in batch else batch["pixels"]).shape[0]
        self._step_skipped = False
        if self.hparams.step_seed is not None:
            # every random draw of a step (t, noise, dropout, drop-path) is a function of (seed, step, micro-batch,
            # rank), so a resumed run draws exactly what the uninterrupted run drew
            micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
            seed = self.hparams.step_seed * 1_000_003 + self.global_step * 1009 + micro * 31 + self.global_rank
            torch.manual_seed(seed % (2**63 - 1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x = self._data(batch, self.encode)
        terms = self.transport.training_losses(self.model, x, **self._condition(batch))
        loss = terms["loss"].mean()
        # all ranks must agree to skip, or DDP's gradient all-reduce would hang
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self._skip_nonfinite(f"loss={loss.item()}")
            return None  # Lightning skips backward and the update
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm before clipping (already unscaled under 16-mixed); skip non-finite updates."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if torch.isfinite(norm):
            self.log("grad_norm", norm, on_step=True, on_epoch=False)
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: the GradScaler skips this step and lowers its scale by design
        for p in self.model.parameters():  # gradients are all-reduced already, so every rank decides alike
            p.grad = None
        self._skip_nonfinite(f"grad_norm={norm.item()}")

    def _skip_nonfinite(self, what: str) -> None:
        """Count a skipped step; after ``max_nonfinite_steps`` in a row stop with a message naming the step."""
        self._step_skipped = True
        self._nonfinite_streak += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self._nonfinite_total), on_step=True, on_epoch=False)
        if self._nonfinite_streak >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_streak} consecutive non-finite steps (last: {what}) at global step "
                f"{self.global_step}; training stopped without updating the weights, so the last checkpoint is good. "
                "Lower model.lr, use trainer.precision=bf16-mixed or 32-true, or set trainer.gradient_clip_val, then "
                "resume with --ckpt_path last"
            )

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then update the EMA at once: callbacks' ``on_train_batch_end`` (ModelCheckpoint) run before the
        module's, so an update there would be missing from the checkpoint written at this step."""
        super().optimizer_step(*args, **kwargs)
        if self._step_skipped:
            return  # no parameter changed
        self._nonfinite_streak = 0
        if self.ema.should_update(self.trainer.global_step + 1):  # global_step counts this step only afterwards
            self.ema.update(self.model)

    # --------------------------------------------------------------------------------------------------- evaluation
    def _fixed_draws(self, x: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, t) depending only on ``val_seed`` and the batch index, so validation losses are comparable."""
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        x0 = torch.randn(x.shape, generator=gen).to(x)
        t = self.transport.sample_time(x.shape[0], generator=gen).to(x.device)
        return x0, t

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._data(batch, self.encode)
        x0, t = self._fixed_draws(x, batch_idx)
        terms = self.transport.training_losses(self.ema, x, x0=x0, t=t, **self._condition(batch))
        self.log("val/loss", terms["loss"].mean(), prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        x = self._data(batch, self.encode)
        x0, t = self._fixed_draws(x, batch_idx)
        terms = self.transport.training_losses(self.ema, x, x0=x0, t=t, **self._condition(batch))
        self.log("test/loss", terms["loss"].mean(), sync_dist=True, batch_size=x.shape[0])

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        indices = batch["index"]
        y = batch.get("y")
        result = self.generate(self.noise(indices), y)
        return {"index": indices.cpu(), "samples": self.decode(result.x).float().cpu(),
                "y": None if y is None else y.cpu(), "nfe": result.nfe}  # fmt: skip

    # ------------------------------------------------------------------------------------------------ optimisation
    @property
    def vae(self):
        """The frozen VAE (``zigma.vae.FrozenVAE``) or None when the model works in pixel space."""
        if self._vae is None and self.hparams.vae:
            from zigma.vae import FrozenVAE

            hp = self.hparams
            self._vae = FrozenVAE(hp.vae, subfolder=hp.vae_subfolder, scale=hp.vae_scale, dtype=hp.vae_dtype,
                                  local_files_only=hp.vae_local_files_only)  # fmt: skip
        if self._vae is not None:
            self._vae.to(self.device)
        return self._vae

    def check_latent_scale(self, data_scale: float | None) -> None:
        """Refuse latents scaled by another VAE scale than the one this model decodes with (one line).

        Args:
            data_scale: the VAE scale of the latents the data yields (``ShardDataModule.vae_scale``); None (pixels,
                or not known): nothing to check. Nothing is checked either without a VAE (pixel-space model).
        """
        if data_scale is None or self.vae is None or math.isclose(self.vae.scale, data_scale, rel_tol=1e-6):
            return
        raise ValueError(f"model.vae_scale={self.vae.scale} but the data's latents are scaled by {data_scale} "
                         f"(data.latent_scale or the shards' manifest): set model.vae_scale={data_scale}")  # fmt: skip

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> model-space latents with the frozen VAE (no gradients)."""
        if self.vae is None:
            raise ValueError("the batch holds pixels to encode but model.vae is not set (a VAE directory or hub id)")
        return self.vae.encode(pixels)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> pixels in [-1, 1] (identity without a VAE)."""
        return x if self.vae is None else self.vae.decode(x)

    @staticmethod
    def _data(batch: dict, encode) -> torch.Tensor:
        return batch["x"] if "x" in batch else encode(batch["pixels"])

    def setup(self, stage: str) -> None:
        if self.hparams.vae:
            _ = self.vae  # load now: a missing VAE fails before the first step
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.hparams.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.hparams.allow_tf32

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(parameter_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                      eps=hp.adam_eps)  # fmt: skip
        total = (
            int(self.trainer.estimated_stepping_batches)
            if self.trainer.max_steps != -1 or hp.lr_schedule == "cosine"
            else 0
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)
        )
        # "name": LearningRateMonitor's tag, lr/pg1 (decayed parameters) and lr/pg2 (not decayed): the same schedule
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """Lightning's ``LearningRateMonitor`` logs the learning rate at every logged step (when there is a logger)."""
        return [LearningRateMonitor(logging_interval="step")] if self.trainer.loggers else []

    def on_train_start(self) -> None:
        """Make a restored optimizer and LR schedule follow the current settings.

        Lightning loads the checkpoint's optimizer param groups (lr, betas, eps, weight decay) and the scheduler's
        ``base_lrs`` over what :meth:`configure_optimizers` built, so a resumed run would keep training with the old
        values. Here every group gets the current settings and the lr of the next step becomes
        ``lr · lr_lambda(step)`` with the current warm-up and schedule. With unchanged settings these are the values
        already there (bit for bit), so an exact resume stays exact; on a fresh run it changes nothing either."""
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # e.g. a --lr_scheduler given to the CLI
            return
        hp = self.hparams
        optimizer = self.optimizers(use_pl_optimizer=False)
        decays = (hp.weight_decay, 0.0)  # the groups of parameter_groups: decayed, not decayed
        for group, decay in zip(optimizer.param_groups, decays):
            group.update(initial_lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps, weight_decay=decay)
        scheduler.base_lrs = [hp.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = hp.lr * factor(scheduler.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the architecture and scan order in plain types next to the weights."""
        checkpoint["zigma"] = {"config": dict(self.model.config), "scan": self.model.scan_spec.canonical_name()}
