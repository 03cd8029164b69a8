"""A frozen Stable Diffusion VAE that maps images in [-1, 1] to model-space latents and back.

Latent conventions (upstream ZigMa, reference §5.1): the posterior of the SD VAE ``AutoencoderKL`` gives raw latents z
(mean and std, 4 channels, 8x smaller than the image). Shards store raw, unscaled latents (or their moments); the model
sees ``z' = (z - shift) * scale`` with ``scale`` the VAE's own ``config.scaling_factor`` (0.18215 =
:data:`SD_LATENT_SCALE` for the SD VAEs), and decoding undoes this (upstream: ``vae.decode(z / 0.18215)``). EDM2
(``training/encoders.py::StabilityVAEEncoder``) instead normalises each channel, ``z' = (z - mean) / std``; pass
``mean``/``std`` for that (EDM2's target std 0.5 is ``std = raw_std / 0.5``). The value is defined here only;
``prepare`` records the scale it used in the shards' manifest (``vae.scale``), from which the DataModules take it.

:class:`FrozenVAE` is deliberately not an ``nn.Module``: assigned to a LightningModule it is never a submodule, so
it never enters a state dict, an optimizer, ``AveragedModel``'s deep copy (``copy.deepcopy`` returns the same object)
or DDP's parameter sync. diffusers is imported only when a VAE is loaded, so ``import zigma`` never needs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from zigma.pretrained import cache_hint, load_local_first

log = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_LATENT_SCALE = 0.18215  # Rombach et al. 2022 (LDM), the SD VAE's latent scaling factor
VAEDtype = Literal["float32", "float16", "bfloat16"]
_TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(VAEDtype)}


def _import_autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("FrozenVAE needs diffusers: pip install diffusers") from err
    return AutoencoderKL


def _download_hint(name: str, subfolder: str | None = None) -> str:
    sub = f", subfolder={subfolder!r}" if subfolder else ""
    return (
        f"On a machine with internet, download it once, either with `hf download {name} --local-dir <dir>` "
        f"(`huggingface-cli download` on older huggingface_hub; then pass name_or_path='<dir>'{sub}) or with "
        f"`python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{name}'{sub})"
        ".save_pretrained('<dir>')\"` (then pass name_or_path='<dir>' and no subfolder); copy <dir> here. "
        + cache_hint()
    )


def _load_autoencoder(name_or_path: str, subfolder: str | None, local_files_only: bool):
    """``AutoencoderKL.from_pretrained`` local-first (``zigma.pretrained.load_local_first``), one clear error."""
    AutoencoderKL = _import_autoencoder_kl()
    # Without accelerate, diffusers warns on every load that low_cpu_mem_usage falls back to False: pass it explicitly.
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False

    def load(source, local_only: bool):
        with warnings.catch_warnings():
            # diffusers 0.42 passes newer huggingface_hub a deprecated argument on every hub load; nothing to act on.
            warnings.filterwarnings("ignore", "The `local_dir_use_symlinks` argument is deprecated", UserWarning)
            return AutoencoderKL.from_pretrained(source, local_files_only=local_only, **kwargs)

    return load_local_first(
        name_or_path, load, owner="FrozenVAE", local_files_only=local_files_only, default_id=DEFAULT_VAE,
        directory_holds="a diffusers AutoencoderKL directory (config.json and diffusion_pytorch_model.safetensors, "
        "as written by save_pretrained)",
        hint=lambda name: _download_hint(name, subfolder if name != DEFAULT_VAE else None), subfolder=subfolder,
    )  # fmt: skip


def _refuse_scale_with_stats(scale: float | None, shift: float) -> None:
    raise ValueError(
        f"FrozenVAE: pass either a global scale/shift or per-channel mean/std, not both; got {scale=}, {shift=} with "
        "mean/std (leave scale and shift at their defaults)"
    )


class FrozenVAE:
    """A frozen diffusers ``AutoencoderKL`` with the latent scaling of latent diffusion; not an ``nn.Module``.

    Images are float tensors in [-1, 1], either (B, 3, H, W) or videos (B, T, 3, H, W), which are coded frame by
    frame (each frame alone; frames of different videos never meet) with the (B, T) axes kept. At most
    ``chunk_size`` images go through the VAE at once. Results are float32 on the input's device; the VAE itself
    runs in ``dtype`` on its own device with autocast disabled and no autograd graph.

    Args:
        name_or_path: a directory written by ``AutoencoderKL.save_pretrained``, or a Hugging Face hub id.
        subfolder: the VAE's subfolder inside ``name_or_path`` (``"vae"`` for a whole SD pipeline repo).
        local_files_only: for a hub id, use only the local Hugging Face cache (never the network).
        scale: global latent scale, z' = (z - shift) * scale; None: the VAE's ``config.scaling_factor``, or
            :data:`SD_LATENT_SCALE` for a VAE config without one.
        shift: global latent shift (0 for the SD VAEs; diffusers' ``shift_factor`` for SD3/FLUX VAEs).
        mean: per-channel raw latent means (EDM2 normalisation z' = (z - mean) / std); needs ``std``.
        std: per-channel divisors, > 0; needs ``mean``. Excludes a ``scale`` other than the default and a ``shift``
            (``scale`` is then unused; :meth:`config` records the default so that a manifest reads as before).
        sample: :meth:`encode` draws a posterior sample (True, as upstream) or returns the posterior mean.
        dtype: the VAE's compute dtype.
        chunk_size: most images per VAE call (bounds activation memory).
        device: where the VAE runs; CPU when None.

    Raises:
        ValueError: a bad argument (named in the message), checked before anything is loaded where possible.
        FileNotFoundError: the VAE is neither a local directory nor in the Hugging Face cache; the message says
            how to download it.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_VAE,
        *,
        subfolder: str | None = None,
        local_files_only: bool = True,
        scale: float | None = None,
        shift: float = 0.0,
        mean: Iterable[float] | None = None,
        std: Iterable[float] | None = None,
        sample: bool = True,
        dtype: VAEDtype = "float32",
        chunk_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
            raise ValueError(f"FrozenVAE: name_or_path must be a directory or a hub id; got {name_or_path!r}")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"FrozenVAE: dtype={dtype!r}; must be one of {list(get_args(VAEDtype))}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"FrozenVAE: chunk_size={chunk_size!r}; must be an int >= 1")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"FrozenVAE: scale={scale!r}; must be a finite number > 0")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift)):
            raise ValueError(f"FrozenVAE: shift={shift!r}; must be a finite number")
        if (mean is None) != (std is None):
            raise ValueError(
                f"FrozenVAE: mean and std go together (per-channel z' = (z - mean) / std); got {mean=}, {std=}"
            )
        if mean is not None:
            if shift != 0.0:
                _refuse_scale_with_stats(scale, shift)
            mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
            if len(mean) != len(std):
                raise ValueError(f"FrozenVAE: mean has {len(mean)} entries but std has {len(std)}")
            if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
                raise ValueError(f"FrozenVAE: mean must be finite and std finite and > 0; got {mean=}, {std=}")

        self.name_or_path = str(name_or_path)
        self.subfolder = subfolder
        self.shift = float(shift)
        self.mean: tuple[float, ...] | None = mean
        self.std: tuple[float, ...] | None = std
        self.sample = bool(sample)
        self.dtype_name: VAEDtype = dtype
        self.chunk_size = chunk_size

        vae = _load_autoencoder(self.name_or_path, subfolder, local_files_only)
        self._vae = vae.eval().requires_grad_(False)
        self.scale = float(scale) if scale is not None else self.own_scale
        if mean is not None and not math.isclose(self.scale, self.own_scale):  # a scale other than the default
            _refuse_scale_with_stats(scale, shift)
        if mean is not None and len(mean) != self.latent_channels:
            raise ValueError(
                f"FrozenVAE: mean/std have {len(mean)} entries but {self.name_or_path} has "
                f"{self.latent_channels} latent channels"
            )
        self._warn_if_scale_differs()
        self._vae.to(device=device if device is not None else "cpu", dtype=_TORCH_DTYPES[dtype])
        log.info("FrozenVAE: %s", self)

    @property
    def own_scale(self) -> float:
        """The VAE config's ``scaling_factor`` (diffusers writes it for every AutoencoderKL it saves), else
        :data:`SD_LATENT_SCALE`: the default of ``scale``."""
        return float(getattr(self._vae.config, "scaling_factor", None) or SD_LATENT_SCALE)

    def _warn_if_scale_differs(self) -> None:
        """A VAE whose own config disagrees with our global scale (SDXL's 0.13025, FLUX's shift) is likely misused."""
        if self.mean is not None:
            return
        own_scale = getattr(self._vae.config, "scaling_factor", None)
        own_shift = getattr(self._vae.config, "shift_factor", None) or 0.0
        if own_scale is not None and not (math.isclose(own_scale, self.scale) and math.isclose(own_shift, self.shift)):
            log.warning(
                "FrozenVAE: %s's config says scaling_factor=%s, shift_factor=%s, but scale=%s, shift=%s are used",
                self.name_or_path,
                own_scale,
                own_shift,
                self.scale,
                self.shift,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Properties, device, copies
    # ------------------------------------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return int(self._vae.config.latent_channels)

    @property
    def in_channels(self) -> int:
        return int(self._vae.config.in_channels)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: one 2x downsampling between consecutive encoder blocks."""
        return 2 ** (len(self._vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self._vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype_name]

    def to(self, device: str | torch.device) -> FrozenVAE:
        """Move the VAE to ``device`` (in place) and return self."""
        self._vae.to(device=device)
        return self

    def __deepcopy__(self, memo: dict) -> FrozenVAE:
        # Frozen weights are shared, never copied: deep-copying a LightningModule (e.g. for EMA) keeps this object.
        return self

    def __copy__(self) -> FrozenVAE:
        return self

    def __repr__(self) -> str:
        norm = f"mean={list(self.mean)}, std={list(self.std)}" if self.mean is not None else f"scale={self.scale}"
        if self.mean is None and self.shift:
            norm += f", shift={self.shift}"
        sub = f", subfolder={self.subfolder!r}" if self.subfolder else ""
        return (
            f"FrozenVAE({self.name_or_path!r}{sub}, {norm}, sample={self.sample}, dtype={self.dtype_name!r}, "
            f"latent_channels={self.latent_channels}, downsample_factor={self.downsample_factor}, device={self.device})"
        )

    def config(self) -> dict[str, Any]:
        """The settings that define the latent space, as plain types (for manifests and checkpoint hparams).

        ``FrozenVAE(**vae.config())`` rebuilds an equivalent VAE. Keys: name_or_path, subfolder, scale, shift,
        mean, std (lists or None), sample, dtype.
        """
        return {
            "name_or_path": self.name_or_path,
            "subfolder": self.subfolder,
            "scale": self.scale,
            "shift": self.shift,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "sample": self.sample,
            "dtype": self.dtype_name,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Latent normalisation (pure tensor maths, no VAE call)
    # ------------------------------------------------------------------------------------------------------------

    def _channel_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) shaped (C, 1, 1) in ``like``'s dtype/device; channels are dim -3 of images and videos."""
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def scale_latents(self, raw: Tensor) -> Tensor:
        """Raw VAE latents (what shards store) -> model space: (z - shift) * scale, or (z - mean) / std per channel.

        Args:
            raw: (..., C, h, w), e.g. (B, C, h, w) or (B, T, C, h, w).
        Returns: same shape and dtype.
        """
        if self.mean is None:
            return (raw - self.shift) * self.scale
        mean, std = self._channel_stats(raw)
        return (raw - mean) / std

    def unscale_latents(self, scaled: Tensor) -> Tensor:
        """Model-space latents -> raw VAE latents; the inverse of :meth:`scale_latents`, same shape and dtype."""
        if self.mean is None:
            return scaled / self.scale + self.shift
        mean, std = self._channel_stats(scaled)
        return scaled * std + mean

    @staticmethod
    def sample_from_moments(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A raw (unscaled) posterior sample z = mean + std * eps, eps ~ N(0, I) drawn on ``generator``'s device.

        Args:
            mean, std: (..., C, h, w) raw posterior moments, as :meth:`encode_moments` returns or shards store.
            generator: for reproducible samples; its device may differ from the moments' (e.g. a CPU generator).
        Returns: (..., C, h, w) float32 on ``mean``'s device; pass it through :meth:`scale_latents` for the model.
        """
        if mean.shape != std.shape:
            raise ValueError(f"sample_from_moments: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ")
        noise_device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return mean.float() + std.float() * eps.to(mean.device)

    # ------------------------------------------------------------------------------------------------------------
    # VAE calls
    # ------------------------------------------------------------------------------------------------------------

    def _frozen(self) -> contextlib.ExitStack:
        """No autograd graph, and autocast off so that ``dtype`` (not an outer bf16-mixed context) decides."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(self.device.type, enabled=False))
        return stack

    def _as_frames(self, x: Tensor, channels: int, what: str, fn: str) -> tuple[Tensor, tuple[int, ...]]:
        """(B, C, H, W) or (B, T, C, H, W) -> ((N, C, H, W) frames, leading dims (B,) or (B, T))."""
        if not isinstance(x, Tensor) or x.ndim not in (4, 5):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"FrozenVAE.{fn}: {what} must be (B, {channels}, H, W) or (B, T, {channels}, H, W); got {shape}"
            )
        if x.shape[-3] != channels:
            raise ValueError(f"FrozenVAE.{fn}: {what} need {channels} channels at dim -3; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"FrozenVAE.{fn}: {what} must be floating point; got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"FrozenVAE.{fn}: {what} are empty; got shape {tuple(x.shape)}")
        lead = tuple(x.shape[:-3])
        return x.reshape(-1, *x.shape[-3:]), lead  # (N, C, H, W), N = B or B * T

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (unscaled) posterior moments of the VAE encoder: what the data-preparation tool stores.

        Args:
            images: (B, 3, H, W) or (B, T, 3, H, W) float in [-1, 1]; H and W divisible by ``downsample_factor``.
        Returns: (mean, std), each (B, C, h, w) or (B, T, C, h, w), float32 on ``images``' device, with
            C = ``latent_channels`` and h, w = H, W / ``downsample_factor``.
        """
        frames, lead = self._as_frames(images, self.in_channels, "images", "encode_moments")  # (N, 3, H, W)
        f = self.downsample_factor
        if frames.shape[-1] % f or frames.shape[-2] % f:
            raise ValueError(
                f"FrozenVAE.encode_moments: image size {tuple(frames.shape[-2:])} is not divisible by the VAE's "
                f"downsample_factor {f}"
            )
        means, stds = [], []
        with self._frozen():
            for chunk in frames.split(self.chunk_size):
                posterior = self._vae.encode(chunk.to(self.device, self.dtype)).latent_dist
                means.append(posterior.mean.float())  # (n, C, h, w)
                stds.append(posterior.std.float())
        mean = torch.cat(means).to(images.device)  # (N, C, h, w)
        std = torch.cat(stds).to(images.device)
        return mean.reshape(*lead, *mean.shape[1:]), std.reshape(*lead, *std.shape[1:])

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Model-space latents: scale_latents(posterior sample) when ``sample``, else scale_latents(posterior mean).

        The noise is drawn once for the whole batch, so results do not depend on ``chunk_size``.

        Args:
            images: (B, 3, H, W) or (B, T, 3, H, W) float in [-1, 1].
            generator: for reproducible posterior samples (see :meth:`sample_from_moments`).
        Returns: (B, C, h, w) or (B, T, C, h, w) float32 on ``images``' device.
        """
        mean, std = self.encode_moments(images)
        raw = self.sample_from_moments(mean, std, generator) if self.sample else mean
        return self.scale_latents(raw)

    def decode(self, latents: Tensor) -> Tensor:
        """Images from model-space latents: clamp(VAE decoder(unscale_latents(latents)), -1, 1).

        Args:
            latents: (B, C, h, w) or (B, T, C, h, w) in model space (as :meth:`encode` returns).
        Returns: (B, 3, H, W) or (B, T, 3, H, W) float32 in [-1, 1] on ``latents``' device, H, W = h, w *
            ``downsample_factor``.
        """
        frames, lead = self._as_frames(latents, self.latent_channels, "latents", "decode")  # (N, C, h, w)
        raw = self.unscale_latents(frames.float())
        outs = []
        with self._frozen():
            for chunk in raw.split(self.chunk_size):
                outs.append(self._vae.decode(chunk.to(self.device, self.dtype)).sample.float().clamp_(-1, 1))
        images = torch.cat(outs).to(latents.device)  # (N, 3, H, W)
        return images.reshape(*lead, *images.shape[1:])


def same_setting(key: str, ours: Any, theirs: Any) -> bool:
    """Whether a setting equals its recorded value up to JSON round trips: tuples as lists, ints as floats, floats
    to a relative 1e-6, a missing shift as 0, local directories by resolved path. Used by
    ``datamodules.manifest``."""
    if key == "shift":
        ours, theirs = ours or 0.0, theirs or 0.0
    if key == "name_or_path" and ours is not None and theirs is not None:
        return _normalise_name(ours) == _normalise_name(theirs)
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours == theirs
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(same_setting("", a, b) for a, b in zip(ours, theirs))
    return ours == theirs


def _normalise_name(name: Any) -> str:
    """A hub id as written; a local directory as its resolved absolute path."""
    text = str(name).rstrip("/")
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text


__all__ = ["DEFAULT_VAE", "SD_LATENT_SCALE", "FrozenVAE", "VAEDtype", "same_setting"]
