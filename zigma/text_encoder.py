"""Caption text -> CLIP text features (N, 77, d), as upstream ZigMa's ``FrozenCLIPEmbedder`` computes them.

Upstream stores, per image, the last hidden states of the CLIP ViT-L/14 text transformer (openai/clip-vit-large-patch14)
for each of its captions: tokenised with ``max_length=77``, ``padding="max_length"`` and truncation, no attention mask
passed (CLIP's text transformer is causal, so padding does not change the states of the real tokens), giving
(N_cap, 77, 768) float features. :class:`CLIPCaptionEncoder` reproduces this for any ``CLIPTextModel``.

The weights load offline by default (``local_files_only=True``): pass a local directory (written by ``save_pretrained``,
or a downloaded hub snapshot; a Stable Diffusion layout with ``tokenizer/`` and ``text_encoder/`` works too) or a hub id
already in the local Hugging Face cache (``zigma.pretrained.load_local_first``, as the VAE). ``transformers`` is
imported only when an encoder is built, so ``import zigma`` does not need it. The frozen twin of
``zigma.vae.FrozenVAE``; ``prepare --clip`` uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zigma.pretrained import cache_hint, load_local_first

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_MAX_LENGTH = 77
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _download_hint(name: str) -> str:
    return (
        f"On a machine with internet, download it once with `hf download {name} --local-dir <dir>` "
        '(`huggingface-cli download` on older huggingface_hub), or with `python -c "from transformers import '
        f"CLIPTokenizer, CLIPTextModel; [c.from_pretrained('{name}').save_pretrained('<dir>') for c in "
        '(CLIPTokenizer, CLIPTextModel)]"`; copy <dir> here and pass it as name_or_path (--clip <dir>). ' + cache_hint()
    )


def _import_clip():
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise ImportError("CLIPCaptionEncoder needs transformers: pip install 'transformers>=4.40'") from err
    return CLIPTokenizer, CLIPTextModel


class CLIPCaptionEncoder:
    """A frozen CLIP text transformer: caption strings -> last hidden states (N, max_length, d) float32.

    Args:
        name_or_path: a local directory holding a CLIP tokenizer and text model (``save_pretrained`` output or a hub
            snapshot; ``tokenizer/`` + ``text_encoder/`` subfolders as in Stable Diffusion repos are used when
            present), or a hub id such as ``"openai/clip-vit-large-patch14"`` (upstream's encoder).
        local_files_only: never contact the hub (the default); a hub id must then be in the local cache.
        max_length: tokens per caption; shorter captions are padded (``padding="max_length"``), longer ones
            truncated. 77 as upstream (CLIP's context length).
        batch_size: most captions per forward pass.
        device: where the model runs; CPU when None.
        dtype: compute dtype (``float32``, ``float16``, ``bfloat16``); results are float32 either way.

    Raises:
        ValueError: a bad argument.
        FileNotFoundError: neither a usable local directory nor in the Hugging Face cache; the message says how to
            download it.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_CLIP,
        *,
        local_files_only: bool = True,
        max_length: int = CLIP_MAX_LENGTH,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: str = "float32",
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length={max_length} and batch_size={batch_size} must be >= 1")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {list(_TORCH_DTYPES)}")
        self.name_or_path = str(name_or_path)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tokenizer, model = self._load(self.name_or_path, local_files_only)
        model_max = getattr(model.config, "max_position_embeddings", None)
        if model_max is not None and self.max_length > model_max:
            raise ValueError(f"max_length={self.max_length} exceeds the model's {model_max} position embeddings")
        self.model = model.to(device=self.device, dtype=_TORCH_DTYPES[dtype]).eval().requires_grad_(False)

    @staticmethod
    def _load(name_or_path: str, local_files_only: bool) -> tuple[Any, Any]:
        CLIPTokenizer, CLIPTextModel = _import_clip()

        def load(source: str | Path, local_only: bool) -> tuple[Any, Any]:
            path = Path(source)
            split = local_only and (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir()  # SD layout
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer" if split else source,
                                                      local_files_only=local_only)  # fmt: skip
            model = CLIPTextModel.from_pretrained(path / "text_encoder" if split else source,
                                                  local_files_only=local_only)  # fmt: skip
            return tokenizer, model

        return load_local_first(
            name_or_path, load, owner="CLIPCaptionEncoder", local_files_only=local_files_only, default_id=DEFAULT_CLIP,
            directory_holds="a CLIP tokenizer + text model directory (config.json, model.safetensors and tokenizer "
            "files: vocab.json + merges.txt or tokenizer.json, as save_pretrained writes)", hint=_download_hint,
        )  # fmt: skip

    @property
    def width(self) -> int:
        """The feature width d (768 for CLIP ViT-L/14)."""
        return int(self.model.config.hidden_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(max_length, d) of one caption's features."""
        return self.max_length, self.width

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, max_length) int64 token ids: padded to ``max_length`` and truncated, as upstream."""
        batch = self.tokenizer(list(captions), truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")  # fmt: skip
        return batch["input_ids"]

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """(N, max_length, d) float32 last hidden states of ``captions``, ``batch_size`` at a time."""
        if isinstance(captions, str):
            raise ValueError("captions: expected a list of strings; got one string (wrap it in a list)")
        captions = list(captions)
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"captions: expected strings; got {type(bad[0]).__name__} {bad[0]!r}")
        if not captions:
            return np.zeros((0, *self.shape), dtype=np.float32)
        out = []
        for start in range(0, len(captions), self.batch_size):
            ids = self.tokenize(captions[start : start + self.batch_size]).to(self.device)
            hidden = self.model(input_ids=ids).last_hidden_state  # (B, L, d)
            out.append(hidden.float().cpu().numpy())
        return np.concatenate(out)

    __call__ = encode

    def config(self) -> dict[str, Any]:
        """Plain settings for a manifest: name_or_path, max_length, width, padding, layer, dtype."""
        return {
            "name_or_path": self.name_or_path,
            "max_length": self.max_length,
            "width": self.width,
            "padding": "max_length",
            "layer": "last_hidden_state",
            "dtype": self.dtype,
        }


__all__ = ["CLIP_MAX_LENGTH", "DEFAULT_CLIP", "CLIPCaptionEncoder"]
