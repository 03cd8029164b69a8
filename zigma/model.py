"""ZigMa: a DiT-style backbone of zigzag-scanned Mamba blocks (Hu et al., ECCV 2024), faithful to upstream.

Forward (image; video folds frames into the token axis, frame-major)::

    h  = x_embedder(x) + pos_embed                         (B, L, D),  L = (img_dim / p)²  [· T for video]
    c  = t_embedder(1000·t) [+ y_embedder(y) | + mean_tokens(y_embedder(y))]          (B, D)
    for block i:  r_{i+1} = r_i + DropPath(h_i);  n = RMSNorm_i(r_{i+1})   (r in fp32, r_1 = h_0)
                  h_{i+1} = n + g_i ⊙ Scan_i(Mamba_i)(n·(1 + s_i) + b_i)   [+ g'_i ⊙ CrossAttn(...)]
    out = unpatchify(FinalLayer(RMSNorm_f(r + DropPath(h))))                  shape of x

t ∈ [0, 1] with 0 = noise and 1 = data; the output is a velocity by default. Note the block re-adds the
*normalised* stream n (not DiT's ``x + gate·f``): upstream's algebra, kept for checkpoint compatibility.
"""

from __future__ import annotations

import difflib
import inspect
import math
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from zigma.layers import (
    CrossAttention,
    DropPath,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    TextEmbedder,
    TimestepEmbedder,
    add_and_norm,
    modulate,
    sincos_2d,
)
from zigma.mamba import MambaMixer
from zigma.scan import LayerScan, ScanFamily, ScanSpec, inverse_permutation


class Block(nn.Module):
    """adaLN-modulated Mamba (+ optional cross-attention) with upstream's fused add-and-norm residual algebra."""

    def __init__(self, dim: int, mixer: MambaMixer, scan: LayerScan, *, has_text: bool, norm: nn.Module,
                 drop_path: float, residual_in_fp32: bool):  # fmt: skip
        super().__init__()
        self.mixer = mixer
        self.scan = scan
        self.norm = norm
        self.residual_in_fp32 = residual_in_fp32
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.has_text = has_text
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (6 if has_text else 3) * dim, bias=True))
        if has_text:
            self.msa = CrossAttention(query_dim=dim, context_dim=dim, heads=8, dim_head=64)
            self.norm_msa = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, residual, c, text=None):
        """x (B, L, D), residual (B, L, D) fp32 or None, c (B, D), text (B, N, D) or None -> (x, residual)."""
        incoming = x if residual is None else self.drop_path(x)
        x, residual = add_and_norm(incoming, residual, self.norm, self.residual_in_fp32)
        mods = self.adaLN_modulation(c).chunk(6 if self.has_text else 3, dim=1)
        x = x + mods[2].unsqueeze(1) * self.scan(self.mixer, modulate(x, mods[0], mods[1]))
        if self.has_text:
            x = x + mods[5].unsqueeze(1) * self.msa(modulate(self.norm_msa(x), mods[3], mods[4]), text)
        return x, residual


def _init_mamba_style(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                      rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1):  # fmt: skip
    """mamba_ssm's ``_init_weights``: zero Linear biases (unless ``_no_reinit``), N(0, 0.02) embeddings, and
    out_proj redrawn with kaiming_uniform(a=√5) / √(n_residuals_per_layer · n_layer) (GPT-2 rescale)."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual and isinstance(module, MambaMixer):
        nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            module.out_proj.weight /= math.sqrt(n_residuals_per_layer * n_layer)


# MambaMixer arguments that ZigMa sets itself; the others may come from ``ssm_cfg``
_MIXER_ARGS_SET_BY_ZIGMA = ("self", "d_model", "bidirectional", "scan_backend", "backward_dt_bias_reinit", "device",
                            "dtype")  # fmt: skip


def _check_ssm_cfg(ssm_cfg: dict | None) -> None:
    """Reject an ``ssm_cfg`` key MambaMixer does not take, with the closest accepted one."""
    accepted = [k for k in inspect.signature(MambaMixer.__init__).parameters if k not in _MIXER_ARGS_SET_BY_ZIGMA]
    unknown = sorted(set(ssm_cfg or {}) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f"did you mean {close[0]}?" if close else f"accepted: {', '.join(accepted)}"
        raise ValueError(f"ssm_cfg: unknown key {unknown[0]!r}; {hint}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


class ZigMa(nn.Module):
    """The ZigMa backbone. Constructor arguments keep upstream's names (so its configs and Quick Demo work).

    Arguments beyond upstream: ``scan_backend`` (``auto|torch|triton|cuda``), ``scan_seed`` (for ``randomN``),
    ``cond_dropout_prob`` (label/caption dropout for classifier-free guidance during training; > 0 also creates the
    learned null class / null caption token; ``cfg_embedding`` forces or suppresses it), and
    ``backward_dt_bias_reinit`` (upstream zeroes the v2 backward dt bias at init; set False to keep its log-uniform
    init). ``fused_add_norm`` and ``use_jit`` are accepted for compatibility and have no effect: the add+norm and
    the permutations are plain PyTorch here. ``device`` defaults to CPU.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        depth: int,
        img_dim: int,
        patch_size: int = 1,
        has_text: bool = False,
        num_classes: int = -1,
        drop_path_rate: float = 0.1,
        n_context_token: int = 0,
        d_context: int = 0,
        ssm_cfg: dict | None = None,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        fused_add_norm: bool = True,
        residual_in_fp32: bool = True,
        initializer_cfg: dict | None = None,
        scan_type: str = "v2",
        video_frames: int = 0,
        tpe: bool = False,
        device: str | torch.device | None = None,
        use_pe: int = 0,
        use_jit: bool = True,
        m_init: bool = True,
        use_checkpoint: bool = False,
        dtype: torch.dtype = torch.float32,
        scan_backend: str = "auto",
        scan_seed: int = 0,
        cond_dropout_prob: float = 0.0,
        cfg_embedding: bool | None = None,
        backward_dt_bias_reinit: bool = True,
    ):
        super().__init__()
        _check_positive(
            in_channels=in_channels, embed_dim=embed_dim, depth=depth, img_dim=img_dim, patch_size=patch_size
        )
        if img_dim % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide img_dim={img_dim}")
        if use_pe not in (0, 1, 2):
            raise ValueError(f"use_pe must be 0 (none), 1 (fixed sin-cos) or 2 (learned); got {use_pe!r}")
        _check_ssm_cfg(ssm_cfg)
        if has_text and (not isinstance(d_context, int) or d_context <= 0):
            raise ValueError(
                f"has_text=True needs d_context > 0 (the caption feature width, e.g. 768); got {d_context!r}"
            )
        if has_text and num_classes > 0:
            raise ValueError("has_text=True and num_classes > 0 are exclusive: a model takes captions or class labels")
        if not isinstance(video_frames, int) or video_frames < 0:
            raise ValueError(f"video_frames must be an integer >= 0 (0 = images); got {video_frames!r}")
        if tpe and video_frames == 0:
            raise ValueError("tpe=True (temporal positional embedding) needs video_frames > 0")
        if not 0.0 <= cond_dropout_prob < 1.0:
            raise ValueError(f"cond_dropout_prob must be in [0, 1); got {cond_dropout_prob!r}")
        from zigma.ops import SCAN_BACKENDS

        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {list(SCAN_BACKENDS)}; got {scan_backend!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating torch dtype; got {dtype!r}")
        spec = ScanSpec.parse(scan_type, seed=scan_seed)
        if video_frames > 0 and not spec.supports_video:
            raise ValueError(
                f"scan_type={scan_type!r} is an image scan but video_frames={video_frames}; video models use "
                "'zzvideo_<pattern>' (e.g. zzvideo_sst) or 'v2' (3D sweep)"
            )
        if video_frames == 0 and spec.is_video_only:
            raise ValueError(f"scan_type={scan_type!r} is a video scan; set video_frames > 0 or use an image scan")

        device = torch.device("cpu") if device is None else torch.device(device)
        grid = img_dim // patch_size
        paths = spec.base_paths(grid)  # validates hilbert grid sizes early
        self.config: dict[str, Any] = {
            "in_channels": in_channels, "embed_dim": embed_dim, "depth": depth, "img_dim": img_dim,
            "patch_size": patch_size, "has_text": has_text, "num_classes": num_classes,
            "drop_path_rate": drop_path_rate, "n_context_token": n_context_token, "d_context": d_context,
            "ssm_cfg": dict(ssm_cfg or {}), "norm_epsilon": norm_epsilon, "rms_norm": rms_norm,
            "residual_in_fp32": residual_in_fp32, "scan_type": scan_type, "video_frames": video_frames, "tpe": tpe,
            "use_pe": use_pe, "m_init": m_init, "use_checkpoint": use_checkpoint, "scan_backend": scan_backend,
            "scan_seed": scan_seed, "cond_dropout_prob": cond_dropout_prob, "cfg_embedding": cfg_embedding,
            "backward_dt_bias_reinit": backward_dt_bias_reinit,
        }  # fmt: skip
        self.scan_spec = spec
        self.in_channels = self.out_channels = in_channels
        self.embed_dim = embed_dim
        self.img_dim = img_dim
        self.patch_size = patch_size
        self.video_frames = video_frames
        self.use_pe = use_pe
        self.tpe = tpe
        self.has_text = has_text
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.residual_in_fp32 = residual_in_fp32
        self.cond_dropout_prob = cond_dropout_prob
        with_null = cond_dropout_prob > 0 if cfg_embedding is None else cfg_embedding

        self.x_embedder = PatchEmbed(img_dim, patch_size, in_channels, embed_dim, video=video_frames > 0)
        self.t_embedder = TimestepEmbedder(embed_dim)
        num_tokens = grid * grid * max(video_frames, 1)
        if use_pe in (1, 2):
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim), requires_grad=use_pe == 2)
        if tpe:
            self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, video_frames, embed_dim))
        if has_text:
            self.y_embedder = TextEmbedder(d_context, embed_dim, cfg_embedding=with_null)
        elif num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, embed_dim, cond_dropout_prob, cfg_embedding=with_null)
        if spec.family is ScanFamily.RANDOM:  # stored in checkpoints so a run's scans never change
            self.register_buffer("random_scan_paths", paths)
            self.register_load_state_dict_post_hook(ZigMa._sync_random_paths)

        # drop-path: block i uses ([0] + linspace(0, rate, depth))[i]; the final add uses the full rate
        rates = [0.0, *torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()]
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon)
        plans = spec.layer_plans(depth, grid, video_frames, paths)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                MambaMixer(
                    embed_dim,
                    bidirectional=plan.bidirectional,
                    scan_backend=scan_backend,
                    backward_dt_bias_reinit=backward_dt_bias_reinit,
                    **(ssm_cfg or {}),
                ),
                LayerScan(plan, num_frames=video_frames),
                has_text=has_text,
                norm=norm_cls(embed_dim),
                drop_path=rates[i],
                residual_in_fp32=residual_in_fp32,
            )
            for i, plan in enumerate(plans)
        )
        self.final_layer = FinalLayer(embed_dim, patch_size, in_channels)
        self.norm_f = norm_cls(embed_dim)

        self.initialize_weights()
        if m_init:
            self.apply(partial(_init_mamba_style, n_layer=depth, **(initializer_cfg or {})))
        self.to(device=device, dtype=dtype)
        for block in self.blocks:  # A_log and D stay fp32 (mamba_ssm keeps them fp32 under any factory dtype)
            for name in ("A_log", "D", "A_b_log", "D_b"):
                if hasattr(block.mixer, name):
                    getattr(block.mixer, name).data = getattr(block.mixer, name).data.float()

    # ----------------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Upstream's DiT-style init: sin-cos PE (use_pe=1), patch conv as a Linear, N(0, .02) t-MLP, adaLN zeroed."""
        if self.use_pe == 1:
            table = torch.from_numpy(sincos_2d(self.embed_dim, self.img_dim // self.patch_size)).float()
            # video: the same 2D table for every frame (upstream's copy_ of an (L, D) table into (T·L, D) crashes)
            self.pos_embed.data.copy_(table.repeat(max(self.video_frames, 1), 1).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        if isinstance(getattr(self, "y_embedder", None), TextEmbedder) and self.y_embedder.has_null:
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)

    @staticmethod
    def _sync_random_paths(module: ZigMa, incompatible_keys) -> None:
        """After loading a checkpoint, rebuild every layer's permutation from the loaded ``random_scan_paths``."""
        plans = module.scan_spec.layer_plans(len(module.blocks), module.img_dim // module.patch_size,
                                             module.video_frames, module.random_scan_paths.cpu())  # fmt: skip
        for block, plan in zip(module.blocks, plans):
            device = block.scan.path.device
            block.scan.path = plan.path.to(device)
            block.scan.inverse = inverse_permutation(plan.path).to(device)

    @property
    def has_null_condition(self) -> bool:
        """Whether the model has a learned null class / null caption (needed for classifier-free guidance)."""
        return bool(getattr(getattr(self, "y_embedder", None), "has_null", False))

    @property
    def is_conditional(self) -> bool:
        return self.has_text or self.num_classes > 0

    def set_scan_backend(self, backend: str) -> None:
        """Switch every mixer's selective-scan backend (``auto|torch|triton|cuda``)."""
        from zigma.ops import SCAN_BACKENDS

        if backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {list(SCAN_BACKENDS)}; got {backend!r}")
        for block in self.blocks:
            block.mixer.scan_backend = backend
        self.config["scan_backend"] = backend

    # ----------------------------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L[·T], p²·C) -> (B, C, H, W) or (B, T, C, H, W), tokens row-major (``nhwpqc -> nchpwq``)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.img_dim // p
        if self.video_frames > 0:
            x = x.reshape(x.shape[0], self.video_frames, h, w, p, p, c)
            return torch.einsum("nthwpqc->ntchpwq", x).reshape(x.shape[0], self.video_frames, c, h * p, w * p)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.video_frames > 0:
            want = (self.video_frames, self.in_channels, self.img_dim, self.img_dim)
            layout = "(B, T, C, H, W)"
        else:
            want = (self.in_channels, self.img_dim, self.img_dim)
            layout = "(B, C, H, W)"
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"ZigMa expects x of shape {layout} = (B, {', '.join(map(str, want))}); got {tuple(x.shape)}"
            )

    def _condition(self, t_emb, y, drop_cond):
        """Returns (c (B, D), cross-attention context (B, N, D) or None)."""
        if not self.is_conditional:
            return t_emb, None
        if y is None:
            kind = "caption features (B, N, d_context)" if self.has_text else "class ids (B,)"
            raise ValueError(f"this model is conditional: pass y = {kind}")
        if self.training and self.cond_dropout_prob > 0:
            random_drop = torch.rand(y.shape[0], device=y.device) < self.cond_dropout_prob
            drop_cond = random_drop if drop_cond is None else drop_cond | random_drop
        if drop_cond is not None and not self.has_null_condition:
            raise ValueError(
                "this model has no learned null class/caption (trained without condition dropout, e.g. an upstream "
                "checkpoint), so it cannot be run unconditionally: use guidance scale 1"
            )
        if self.has_text:
            context = self.y_embedder(y, drop_cond)
            return t_emb + context.mean(dim=1), context
        return t_emb + self.y_embedder(y, drop_cond), None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x (B, C, H, W) or (B, T, C, H, W); t (B,) in [0, 1] (0 = noise); y None, (B,) ids or (B, N, d_context);
        drop_cond (B,) bool: rows replaced by the null condition (classifier-free guidance). Returns x's shape."""
        self._check_input(x)
        h = self.x_embedder(x)  # (B, L, D), L = (H/p)(W/p) [· T]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        c, context = self._condition(self.t_embedder((t * 1000.0).to(h.dtype)), y, drop_cond)  # (B, D)
        if self.use_pe in (1, 2):
            h = h + self.pos_embed
        if self.tpe:
            frames = h.view(h.shape[0], self.video_frames, -1, h.shape[-1])
            h = (frames + self.temporal_pos_embedding[:, :, None]).flatten(1, 2)
        residual = None
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h, residual = torch.utils.checkpoint.checkpoint(block, h, residual, c, context, use_reentrant=False)
            else:
                h, residual = block(h, residual, c, context)
        h, _ = add_and_norm(self.drop_path(h), residual, self.norm_f, self.residual_in_fp32)
        return self.unpatchify(self.final_layer(h))
