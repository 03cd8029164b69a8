"""Scan orders: which token sequence each layer's Mamba reads. ``ScanSpec`` is the only parser of ``scan_type``.

A *path* is a visit order: ``path[k]`` is the row-major index of the token read at sequence position ``k``
(so ``x[:, path]`` puts tokens in scan order and ``y[:, argsort(path)]`` puts them back). ZigMa's layers use
``P⁻¹ ∘ Mamba ∘ P``: gather the ``(B, L, D)`` block input into scan order, run an ordinary causal Mamba,
scatter the output back (see ``zigma.upstream.md`` §3.4: identical to upstream's gather of ``xz``).

Accepted ``scan_type`` values (upstream spelling first, then aliases):

=========================  ===============================================================================
``zigzagN{K}``/``zigzag{K}``  the first K of the 8 boustrophedon paths; layer i uses path ``i mod K``
``v2`` / ``sweep2``          bidirectional raster (a second, backward parameter set in the mixer); for video
                              this is the 3D sweep over the frame-major ``T·L`` sequence
``v1`` / ``sweep1``          unidirectional raster (identity order; upstream rejects it, kept as a baseline)
``hilbertN{K}``/``hilbert{K}``  8 dihedral variants of the Hilbert curve (a true visit order: upstream
                              gathered with the rank map, i.e. the inverse permutation — bug fixed)
``randomN{K}``/``random{K}``  K random permutations from ``torch.Generator().manual_seed(scan_seed)``: the same
                              on every rank, and stored in checkpoints as a persistent buffer
``zzvideo_{p}``/``video_{p}``  factorised video scan, ``p`` over {s, t} with both letters (e.g. ``sst``, ``st``):
                              layer i is spatial if ``(p * depth)[i] == 's'`` (per-frame zigzag, the j-th spatial
                              layer using path ``j mod 8``) else temporal (per location over frames, the j-th
                              temporal layer forward for even j, backward for odd j)
=========================  ===============================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn


class ScanFamily(str, Enum):
    ZIGZAG = "zigzag"
    HILBERT = "hilbert"
    RANDOM = "random"
    SWEEP1 = "sweep1"
    SWEEP2 = "sweep2"
    VIDEO = "video"


class LayerMode(str, Enum):
    """How a layer groups the ``T·L`` tokens before applying its permutation."""

    FLAT = "flat"  # one sequence of all tokens (images; 3D sweep over frame-major video tokens)
    SPATIAL = "spatial"  # one sequence per frame, permuted within the frame
    TEMPORAL = "temporal"  # one sequence per spatial location, over frames


VALID_SCAN_FORMS = (
    "zigzagN{1..8} (alias zigzag{K})",
    "v2 (alias sweep2)",
    "v1 (alias sweep1)",
    "hilbertN{1..8} (alias hilbert{K})",
    "randomN{1..8} (alias random{K})",
    "zzvideo_<pattern> / video_<pattern> with pattern over {s,t} using both letters, e.g. sst, st",
)

_K_FAMILIES = {"zigzag": ScanFamily.ZIGZAG, "hilbert": ScanFamily.HILBERT, "random": ScanFamily.RANDOM}


# --------------------------------------------------------------------------------------------------------------
# Paths on an N x N grid (row-major token index = row * N + col)
# --------------------------------------------------------------------------------------------------------------


def zigzag_paths(n: int) -> list[np.ndarray]:
    """The 8 boustrophedon visit orders of an n x n grid, in upstream's order.

    For each corner ``(r0, c0, dr, dc)`` in TL, TR, BL, BR: a row snake (rows outward from the corner, alternating
    direction) then a column snake. For even n these are 4 curves x 2 directions.
    """
    paths = []
    for r0, c0, dr, dc in [(0, 0, 1, 1), (0, n - 1, 1, -1), (n - 1, 0, -1, 1), (n - 1, n - 1, -1, -1)]:
        row_snake = [(r0 + dr * i) * n + c0 + dc * (j if i % 2 == 0 else n - 1 - j) for i in range(n) for j in range(n)]
        col_snake = [(r0 + dr * (i if j % 2 == 0 else n - 1 - i)) * n + c0 + dc * j for j in range(n) for i in range(n)]
        paths += [np.array(row_snake, dtype=np.int64), np.array(col_snake, dtype=np.int64)]
    return paths


def _hilbert_rank_grid(n: int) -> np.ndarray:
    """``grid[r, c]`` = position of cell (r, c) along the Hilbert curve of order log2(n) (classic d -> (x, y))."""
    grid = np.empty((n, n), dtype=np.int64)
    for d in range(n * n):
        x = y = 0
        t = d
        s = 1
        while s < n:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:  # rotate the quadrant
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x += s * rx
            y += s * ry
            t //= 4
            s *= 2
        grid[y, x] = d
    return grid


def hilbert_paths(n: int) -> list[np.ndarray]:
    """8 Hilbert visit orders of an n x n grid (n a power of two), from the dihedral variants of the rank grid.

    Variants in upstream's order: identity, transpose, rot90, rot90ᵀ, rot180, rot180ᵀ, rot270, rot270ᵀ. Upstream
    flattened these *rank* grids and gathered with them (the inverse permutation: not continuous); the visit
    order is ``argsort(rank.flatten())``.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"hilbert scans need a power-of-two token grid side (img_dim / patch_size); got {n}")
    rank = _hilbert_rank_grid(n)
    variants = []
    for k in range(4):
        rotated = np.rot90(rank, k)
        variants += [rotated, rotated.T]
    return [np.argsort(v.reshape(-1), kind="stable").astype(np.int64) for v in variants]


def random_paths(num_tokens: int, k: int, seed: int) -> torch.Tensor:
    """(k, num_tokens) random permutations from a dedicated generator: identical on every rank and machine."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tokens, generator=gen) for _ in range(k)])


def inverse_permutation(path: torch.Tensor) -> torch.Tensor:
    """``inv[path[i]] = i`` (upstream's ``reverse_permut_np``)."""
    inv = torch.empty_like(path)
    inv[path] = torch.arange(path.numel(), device=path.device)
    return inv


# --------------------------------------------------------------------------------------------------------------
# The spec and the per-layer plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerScanPlan:
    """What one layer does: group tokens by ``mode`` and read them in ``path`` order (None = identity)."""

    mode: LayerMode
    path: torch.Tensor | None
    bidirectional: bool = False


@dataclass(frozen=True)
class ScanSpec:
    """A parsed ``scan_type``. Build with :meth:`parse`; ask :meth:`layer_plans` for every layer's order."""

    family: ScanFamily
    num_paths: int = 1
    video_pattern: str = ""
    seed: int = 0

    @classmethod
    def parse(cls, scan_type: str, *, seed: int = 0) -> ScanSpec:
        if not isinstance(scan_type, str):
            raise ValueError(f"scan_type must be a string, one of: {'; '.join(VALID_SCAN_FORMS)}; got {scan_type!r}")
        name = scan_type.strip()
        if name in ("v2", "sweep2"):
            return cls(ScanFamily.SWEEP2)
        if name in ("v1", "sweep1"):
            return cls(ScanFamily.SWEEP1)
        match = re.fullmatch(r"(zigzag|hilbert|random)N?([1-8])", name)
        if match:
            return cls(_K_FAMILIES[match.group(1)], num_paths=int(match.group(2)), seed=seed)
        match = re.fullmatch(r"(?:zz)?video_([st]+)", name)
        if match and set(match.group(1)) == {"s", "t"}:
            return cls(ScanFamily.VIDEO, num_paths=8, video_pattern=match.group(1))
        raise ValueError(f"unknown scan_type {scan_type!r}; valid forms: {'; '.join(VALID_SCAN_FORMS)}")

    @property
    def bidirectional(self) -> bool:
        return self.family is ScanFamily.SWEEP2

    @property
    def is_video_only(self) -> bool:
        return self.family is ScanFamily.VIDEO

    @property
    def supports_video(self) -> bool:
        """Scans defined over frame-major video tokens: the factorised video scans and the 3D sweep."""
        return self.family in (ScanFamily.VIDEO, ScanFamily.SWEEP2)

    def canonical_name(self) -> str:
        if self.family is ScanFamily.SWEEP2:
            return "v2"
        if self.family is ScanFamily.SWEEP1:
            return "v1"
        if self.family is ScanFamily.VIDEO:
            return f"zzvideo_{self.video_pattern}"
        return f"{self.family.value}N{self.num_paths}"

    def base_paths(self, grid_side: int) -> torch.Tensor | None:
        """(K, grid_side²) distinct paths of this spec (None for raster scans)."""
        if self.family in (ScanFamily.ZIGZAG, ScanFamily.VIDEO):
            return torch.from_numpy(np.stack(zigzag_paths(grid_side)[: self.num_paths]))
        if self.family is ScanFamily.HILBERT:
            return torch.from_numpy(np.stack(hilbert_paths(grid_side)[: self.num_paths]))
        if self.family is ScanFamily.RANDOM:
            return random_paths(grid_side * grid_side, self.num_paths, self.seed)
        return None

    def layer_plans(self, depth: int, grid_side: int, video_frames: int = 0, paths: torch.Tensor | None = None):
        """One :class:`LayerScanPlan` per layer. ``paths`` overrides :meth:`base_paths` (e.g. loaded random paths)."""
        if paths is None:
            paths = self.base_paths(grid_side)
        if self.family in (ScanFamily.SWEEP1, ScanFamily.SWEEP2):
            return [LayerScanPlan(LayerMode.FLAT, None, self.bidirectional) for _ in range(depth)]
        if self.family is not ScanFamily.VIDEO:
            return [LayerScanPlan(LayerMode.FLAT, paths[i % len(paths)]) for i in range(depth)]
        forward_t = torch.arange(video_frames)
        order = (self.video_pattern * depth)[:depth]
        plans, n_spatial, n_temporal = [], 0, 0
        for letter in order:
            if letter == "s":
                plans.append(LayerScanPlan(LayerMode.SPATIAL, paths[n_spatial % len(paths)]))
                n_spatial += 1
            else:
                time_path = forward_t if n_temporal % 2 == 0 else forward_t.flip(0)
                plans.append(LayerScanPlan(LayerMode.TEMPORAL, time_path))
                n_temporal += 1
        return plans


class LayerScan(nn.Module):
    """Applies ``P⁻¹ ∘ mixer ∘ P`` for one layer; the permutation lives in non-persistent buffers.

    Input/output ``(B, T·L, D)`` tokens, frame-major for video (index = t·L + k).
    """

    def __init__(self, plan: LayerScanPlan, num_frames: int = 1):
        super().__init__()
        self.mode = plan.mode
        self.num_frames = max(1, num_frames)
        self.register_buffer("path", plan.path, persistent=False)
        self.register_buffer("inverse", None if plan.path is None else inverse_permutation(plan.path), persistent=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode.value}, permuted={self.path is not None}"

    def forward(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mode is LayerMode.FLAT:
            if self.path is None:
                return mixer(x)
            return mixer(x[:, self.path])[:, self.inverse]
        b, tl, d = x.shape
        t = self.num_frames
        frames = x.view(b, t, tl // t, d)
        if self.mode is LayerMode.SPATIAL:  # (B·T) sequences of L tokens
            seq = frames[:, :, self.path].reshape(b * t, tl // t, d)
            out = mixer(seq).view(b, t, tl // t, d)[:, :, self.inverse]
            return out.reshape(b, tl, d)
        # TEMPORAL: (B·L) sequences of T frames
        seq = frames.transpose(1, 2)[:, :, self.path].reshape(b * (tl // t), t, d)
        out = mixer(seq).view(b, tl // t, t, d)[:, :, self.inverse]
        return out.transpose(1, 2).reshape(b, tl, d)
