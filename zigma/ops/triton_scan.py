"""Fused Mamba-1 selective scan in Triton (the ``triton`` backend): forward and backward, channel-last, chunked along L.

Same contract as :mod:`zigma.ops.reference` (mamba_ssm's ``selective_scan_fn``)::

    u, delta, z : (B, D, L)            A : (D, N) fp32          B, C : (B, N, L) or (B, 1, N, L)
    D, delta_bias : (D,) fp32          out : (B, D, L) in u's dtype; last_state : (B, D, N) fp32, no gradient

    Δ'_t  = softplus(Δ_t + delta_bias)  if delta_softplus  else  Δ_t + delta_bias      (softplus threshold 20, as torch)
    softplus(x) = x if x > 20 else log1p(exp(x))          (log1p by Kahan's trick: within 1e-6 relative of F.softplus)
    h_t   = exp(Δ'_t ⊗ A) ⊙ h_{t-1} + (Δ'_t ⊙ u_t) ⊗ B_t,    h_{-1} = 0                (Mamba paper, Eq. 2a + ZOH/Euler)
    y_t   = Σ_n C_t[n] h_t[:, n] + D ⊙ u_t
    out_t = y_t ⊙ silu(z_t)  if z is given  else  y_t

Layout. The kernels read u, Δ, z and write out, du, dΔ, dz as channel-last ``(B, L, D)`` rows, and B, C as
``(B, L, N)``. The model produces these as transposed views of ``(B, L, D)`` tensors, so ``u.transpose(1, 2)`` is
free when ``u.stride(1) == 1``; other layouts are copied once. The returned ``out`` is the ``(B, D, L)`` view of a
channel-last buffer. All arithmetic is fp32 (bf16/fp16/fp32 inputs); the state ``h`` is an fp32 ``[BLOCK_D, N]``
register tile.

L is cut into chunks of ``T = chunk_size`` steps (a power of two). Chunk-start states ``H_c = h_{cT-1}``
``(B, n_chunks, D, N)`` fp32 are the only activations kept for backward (never every h_t), and they are written only
when a gradient can flow (grad mode on and an input requiring grad): sampling under ``no_grad`` neither allocates nor
writes them. Tiles, warps, the chunk length, splits and the reduction mode are a :class:`TritonScanConfig`.

Forward, three kernels (the first two only when the L range is split over ``S > 1`` programs, i.e. small batch):

S comes from occupancy: enough programs for ``fwd_programs_per_sm`` per SM (or ``config.l_split``). Both sequential
kernels load step t+1's inputs before step t's math (software prefetch), so the L loop does not wait on memory.

1. ``_fwd_local_kernel``, grid (B, D/BLOCK_D, S-1): scan split s from zero state; store its end state hl_s and its
   decay P_s = Π_t exp(Δ'_t A) = exp2(Σ_t Δ'_t A log2 e).
2. ``_state_passing_kernel``: split-start states sequentially, hs_0 = 0, hs_{s+1} = P_s ⊙ hs_s + hl_s (exact, since
   the recurrence is affine in h).
3. ``_fwd_kernel``, grid (B, D/BLOCK_D, S): sequential loop over the split's time steps from hs_s, storing the gated
   output, the chunk-start states H_c (when a gradient is needed) and, in the last split, h_{L-1}. With the default
   one warp per program the per-step output sum over N is a warp reduction: no shared memory or barrier per step.

Backward, per chunk c = [s_c, e_c) (again three kernels; the first two only when n_chunks > 1):

    dy_t  = dout_t ⊙ silu(z_t)                       dz_t = dout_t ⊙ y_t ⊙ σ(z_t)(1 + z_t(1 - σ(z_t)))
    dh_t  = C_t ⊗ dy_t + exp(Δ'_{t+1} A) ⊙ dh_{t+1}   (adjoint recurrence, backwards in time)
    g_t   = dh_t ⊙ exp(Δ'_t A) ⊙ h_{t-1} = dh_t ⊙ (h_t - (Δ'_t u_t) ⊗ B_t)      (no division by exp(Δ'A))
    dC_t  = Σ_d dy_t[d] h_t[d, :]      dB_t = Σ_d dh_t[d, :] Δ'_t[d] u_t[d]      dA = Σ_{b,t} g_t ⊙ Δ'_t
    dΔ'_t = Σ_n g_t[:, n] A[:, n] + u_t ⊙ Σ_n dh_t[:, n] B_t[n]    du_t = dy_t ⊙ D + Δ'_t ⊙ Σ_n dh_t[:, n] B_t[n]
    dΔ_t  = dΔ'_t ⊙ σ(Δ_t + delta_bias) if delta_softplus       dD = Σ dy ⊙ u       d delta_bias = Σ dΔ

1. ``_bwd_local_kernel``, grid (B, D/BLOCK_D, n_chunks-1): for chunks 1.., run the adjoint recurrence from zero
   (prefetching step t-1) and store the local carry lc_c = exp(Δ'_{s_c} A) ⊙ dhl_{s_c} and the chunk decay P_c.
2. ``_state_passing_kernel`` (reversed): carry into chunk c from the chunks after it, K_{n-1} = 0,
   K_{c-1} = lc_c + P_c ⊙ K_c, so that dh_t = dhl_t + (Π_{s=t+1}^{e_c-1} exp(Δ'_s A)) ⊙ K_c.
3. ``_bwd_kernel``, grid (B, D/BLOCK_D, n_chunks): loads the chunk as [T, BLOCK_D] tiles and, per state n (as the
   CUDA kernel does), recomputes h over the chunk from H_c with a forward ``tl.associative_scan`` of the affine maps
   (a, b) ∘ (a', b') = (a a', a' b + b'), runs the adjoint recurrence with a reversed scan plus the carry K_c, and
   accumulates the gradients. dB/dC are reduced over the program's BLOCK_D channels, dA/dD/d delta_bias over its T
   steps. Then either (default, ``deterministic=False``) ``tl.atomic_add``-ed into fp32 (B, L, N), (D, N) and (D,)
   buffers, not bit-deterministic; or (``deterministic=True``) stored as per-program partials, (D/BLOCK_D, B, L, N)
   for dB/dC, (B, n_chunks, D, N) for dA and (B, n_chunks, D) for dD/d delta_bias, and summed by ``torch.sum``:
   bit-identical run to run at the cost of those buffers. The default is provisional until
   ``benchmarks/triton_triage.py`` times both on a GPU.

The op is registered as ``torch.ops.zigma.selective_scan_fwd`` / ``selective_scan_bwd`` (``torch.library.custom_op``
with fake and autograd registrations), so ``torch.compile`` traces a model calling it without graph breaks.

Kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
this module was imported (how the CPU tests, ``tests/zigma/ops/test_triton_scan.py``, run them). Registers, spills and
barriers of every kernel for sm_80/sm_90 come from ``benchmarks/triton_compile_report.py`` (checked in CI by
``tests/zigma/ops/test_triton_compile.py``, no GPU needed). The compiled-GPU check at full shapes is
``benchmarks/check_scan_gpu.py``; timings are ``benchmarks/scan_gpu.py`` and ``benchmarks/triton_triage.py``. The
default config is chosen from compile reports (no spills, backward ≤ 128 registers), not yet from GPU timings.
"""

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "TritonScanConfig", "selective_scan_triton"]

_PASS_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class TritonScanConfig:
    """Tiling, warps and splits of the Triton scan: parameters a benchmark can sweep, never module state.

    Defaults come from the compile report (``benchmarks/triton_compile_report.py``, table in
    ``benchmarks/RESULTS.md``): every kernel compiles without spills for sm_80 and sm_90 at the model's shapes, and the
    backward at ≤ 128 registers per thread. They are NOT yet tuned by timing on a GPU: ``benchmarks/triton_triage.py``
    sweeps them on the first lent GPU.

    Attributes:
        chunk_size: T, steps between saved chunk-start states (power of two); also the backward tile height. Saved
            states cost B·(L/T)·D·N·4 bytes (= 2·B·L·D bytes at T = 32, N = 16).
        fwd_block_d: channels per forward program (power of two); its [fwd_block_d, N] state tile lives in registers.
        fwd_warps: warps per forward program. With one warp, the per-step output (a reduction over N) reaches the
            storing lanes by warp shuffles: no shared-memory round trip and no barrier in the L loop (with 2 or 4
            warps the compiled loop has two ``bar.sync`` per step; the compile report counts them).
        bwd_block_d: channels per backward program (power of two); the backward holds [T, bwd_block_d] fp32 tiles.
        bwd_warps: warps per backward program. Registers grow with the tile elements per thread,
            chunk_size · bwd_block_d / (32 · bwd_warps) (sm_90, bf16): ≤ 2 compiles to 90-111 registers at T 32, 64
            and 128 (e.g. 32·16, 64·8 or 128·4 with 8 warps), 4 to 139-143 (but 32·32 with 8 warps spills a little),
            8 to 235-255, 16 spills.
        l_split: forward programs along L; 0 picks it from occupancy (see ``fwd_programs_per_sm``).
        fwd_programs_per_sm: resident forward programs per SM to aim for when ``l_split`` is 0. The compile report
            gives the one-warp forward kernel 72-80 registers, so the register file holds ~25 of them per SM; 24
            fills an SM without queueing programs behind each other.
        deterministic: reduce dA, dD, d delta_bias, dB and dC through per-program partial sums and a ``sum``
            (bit-identical run to run; extra memory ≈ 2·(D/bwd_block_d)·B·L·N·4 bytes, 400 MB at B 32, L 1024,
            D 1536, N 16, during one layer's backward) instead of fp32 atomics.
            Provisional default False (atomics), to be settled by ``benchmarks/triton_triage.py``'s timing.
    """

    chunk_size: int = 32
    fwd_block_d: int = 16
    fwd_warps: int = 1
    bwd_block_d: int = 16
    bwd_warps: int = 8
    l_split: int = 0
    fwd_programs_per_sm: int = 24
    deterministic: bool = False

    def __post_init__(self):
        for name in ("chunk_size", "fwd_block_d", "fwd_warps", "bwd_block_d", "bwd_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"TritonScanConfig: {name}={value!r}; must be a power of two >= 1")
        for name, low in (("l_split", 0), ("fwd_programs_per_sm", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TritonScanConfig: {name}={value!r}; must be an int >= {low}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"TritonScanConfig: deterministic={self.deterministic!r}; must be True or False")

    def to_ints(self) -> list[int]:
        """The fields as ints, in declaration order (how the custom op's schema carries them)."""
        return [int(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def from_ints(cls, values) -> "TritonScanConfig":
        fields = dataclasses.fields(cls)
        if len(values) != len(fields):
            raise ValueError(f"TritonScanConfig: expected {len(fields)} ints, got {len(values)}")
        return cls(**{f.name: (bool(v) if f.type in (bool, "bool") else int(v)) for f, v in zip(fields, values)})


DEFAULT_CONFIG = TritonScanConfig()


@triton.jit
def _exp(x):
    """exp(x) to ~2 ulp on GPU too: 2^n · 2^(r log2 e) with r = x - n ln 2 (Cody-Waite split of ln 2), n integer.

    ``tl.exp`` compiles to ``ex2.approx(x · log2 e)``, whose rounding of x · log2 e costs ~|x|·1e-7 relative.
    """
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693145751953125 - n * 1.4286068203094173e-06
    return tl.exp2(n) * tl.exp2(r * 1.4426950408889634)


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)).

    log1p(e) uses Kahan's trick, w = 1 + e rounded: e if w == 1 else log(w) · e / (w - 1), which stays within a few
    ulp where ``log(1 + exp(x))`` loses all digits (x < -7). x is clamped to [-200, 20] for the exp only (exp(-200)
    underflows to 0 anyway); ``tl.where`` keeps NaN a NaN.
    """
    e = _exp(tl.where(x > 20.0, 20.0, tl.where(x < -200.0, -200.0, x)))
    w = 1.0 + e
    w_minus_1 = tl.where(w == 1.0, 1.0, w - 1.0)
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / w_minus_1))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _affine_combine(a_l, b_l, a_r, b_r):
    """Compose h -> a_l h + b_l (earlier) with h -> a_r h + b_r (later): h -> a_l a_r h + (a_r b_l + b_r)."""
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _load_dt(dt_row, t, s_tl, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ'_t = softplus(Δ_t + bias) (or without either) as fp32 [BLOCK_D], 0 where ``mask`` is off."""
    dt = tl.load(dt_row + t * s_tl, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _fwd_local_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, hend_ptr, decay_ptr,
    seqlen, dim, dstate, steps_per_split,
    s_ub, s_ul, s_ud, s_tb, s_tl, s_td, s_ad, s_an, s_bb, s_bl, s_bn,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Split s < S-1 from zero state: hend[b, s] = h at the split's end, decay[b, s] = Π_t exp(Δ'_t A).

    Step t+1's inputs are loaded before step t's math (software prefetch), so the loop does not wait on memory.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_local = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn, other=0.0).to(tl.float32)
    a2 = a2 * 1.4426950408889634  # exp(Δ'A) = exp2(Δ'A log2 e)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    dt_row = dt_ptr + pid_b * s_tb + offs_d * s_td
    b_row = B_ptr + pid_b * s_bb + offs_n * s_bn
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    log_decay = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    t_begin = pid_s * steps_per_split
    t_end = tl.minimum(t_begin + steps_per_split, seqlen)
    u_t = tl.load(u_row + t_begin * s_ul, mask=mask_d, other=0.0).to(tl.float32)
    dt_t = _load_dt(dt_row, t_begin, s_tl, mask_d, bias, HAS_BIAS, SOFTPLUS)
    b_t = tl.load(b_row + t_begin * s_bl, mask=mask_n, other=0.0).to(tl.float32)
    for t in range(t_begin, t_end):
        more = t + 1 < t_end  # prefetch step t+1
        u_next = tl.load(u_row + (t + 1) * s_ul, mask=mask_d & more, other=0.0).to(tl.float32)
        dt_next = _load_dt(dt_row, t + 1, s_tl, mask_d & more, bias, HAS_BIAS, SOFTPLUS)
        b_next = tl.load(b_row + (t + 1) * s_bl, mask=mask_n & more, other=0.0).to(tl.float32)
        da = dt_t[:, None] * a2
        h = tl.exp2(da) * h + (dt_t * u_t)[:, None] * b_t[None, :]
        log_decay += da
        u_t, dt_t, b_t = u_next, dt_next, b_next
    offs = ((pid_b * n_local + pid_s) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    tl.store(hend_ptr + offs, h, mask=mask_dn)
    tl.store(decay_ptr + offs, tl.exp2(log_decay), mask=mask_dn)


@triton.jit
def _state_passing_kernel(local_ptr, decay_ptr, out_ptr, n_seg, inner, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Sequential combine of segment states, local/decay (B, n_seg-1, inner), out (B, n_seg, inner), all fp32.

    Forward:  out[0] = 0, out[k+1] = decay[k] ⊙ out[k] + local[k].
    Reverse:  out[n_seg-1] = 0, out[k] = decay[k] ⊙ out[k+1] + local[k].
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    h = tl.zeros([BLOCK], dtype=tl.float32)
    if REVERSE:
        tl.store(out_ptr + (pid_b * n_seg + n_seg - 1) * inner + offs, h, mask=mask)
    else:
        tl.store(out_ptr + pid_b * n_seg * inner + offs, h, mask=mask)
    for i in range(0, n_seg - 1):
        if REVERSE:
            k = n_seg - 2 - i
            dst = k
        else:
            k = i
            dst = i + 1
        src = (pid_b * (n_seg - 1) + k) * inner + offs
        h = tl.load(decay_ptr + src, mask=mask, other=0.0) * h + tl.load(local_ptr + src, mask=mask, other=0.0)
        tl.store(out_ptr + (pid_b * n_seg + dst) * inner + offs, h, mask=mask)


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, hstart_ptr, out_ptr, states_ptr, last_ptr,
    seqlen, dim, dstate, n_chunks, steps_per_split,
    s_ub, s_ul, s_ud, s_tb, s_tl, s_td, s_zb, s_zl, s_zd, s_ad, s_an,
    s_bb, s_bl, s_bn, s_cb, s_cl, s_cn, s_ob, s_ol,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_HSTART: tl.constexpr, STORE_STATES: tl.constexpr,
):  # fmt: skip
    """Sequential scan of one (batch, BLOCK_D channels, L split): gated output, chunk-start states, last state.

    One loop over the split's steps; step t+1's u, Δ, z, B, C are loaded before step t's math (software prefetch).
    Chunk-start states are stored only with STORE_STATES (i.e. when a backward will need them).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn, other=0.0).to(tl.float32)
    a2 = a2 * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(Dv_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    dt_row = dt_ptr + pid_b * s_tb + offs_d * s_td
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    out_row = out_ptr + pid_b * s_ob + offs_d
    b_row = B_ptr + pid_b * s_bb + offs_n * s_bn
    c_row = C_ptr + pid_b * s_cb + offs_n * s_cn
    offs_dn = offs_d[:, None] * dstate + offs_n[None, :]  # into (D, N) fp32 slabs
    if HAS_HSTART:
        h = tl.load(hstart_ptr + (pid_b * n_split + pid_s) * dim * dstate + offs_dn, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    t_begin = pid_s * steps_per_split  # a multiple of T
    t_end = tl.minimum(t_begin + steps_per_split, seqlen)
    u_t = tl.load(u_row + t_begin * s_ul, mask=mask_d, other=0.0).to(tl.float32)
    dt_t = _load_dt(dt_row, t_begin, s_tl, mask_d, bias, HAS_BIAS, SOFTPLUS)
    b_t = tl.load(b_row + t_begin * s_bl, mask=mask_n, other=0.0).to(tl.float32)
    c_t = tl.load(c_row + t_begin * s_cl, mask=mask_n, other=0.0).to(tl.float32)
    z_t = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_Z:
        z_t = tl.load(z_row + t_begin * s_zl, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(t_begin, t_end):
        more = t + 1 < t_end  # prefetch step t+1
        u_next = tl.load(u_row + (t + 1) * s_ul, mask=mask_d & more, other=0.0).to(tl.float32)
        dt_next = _load_dt(dt_row, t + 1, s_tl, mask_d & more, bias, HAS_BIAS, SOFTPLUS)
        b_next = tl.load(b_row + (t + 1) * s_bl, mask=mask_n & more, other=0.0).to(tl.float32)
        c_next = tl.load(c_row + (t + 1) * s_cl, mask=mask_n & more, other=0.0).to(tl.float32)
        z_next = z_t
        if HAS_Z:
            z_next = tl.load(z_row + (t + 1) * s_zl, mask=mask_d & more, other=0.0).to(tl.float32)
        if STORE_STATES:  # noqa: SIM102 - a compile-time branch around a run-time one
            if t % T == 0:  # H_c = h_{cT-1}, the state entering chunk c
                tl.store(states_ptr + (pid_b * n_chunks + t // T) * dim * dstate + offs_dn, h, mask=mask_dn)
        h = tl.exp2(dt_t[:, None] * a2) * h + (dt_t * u_t)[:, None] * b_t[None, :]
        y = tl.sum(h * c_t[None, :], axis=1)
        if HAS_D:
            y += d_skip * u_t
        if HAS_Z:
            y = y * z_t * tl.sigmoid(z_t)
        tl.store(out_row + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        u_t, dt_t, b_t, c_t, z_t = u_next, dt_next, b_next, c_next, z_next
    tl.store(last_ptr + pid_b * dim * dstate + offs_dn, h, mask=mask_dn & (pid_s == n_split - 1))


@triton.jit
def _load_dy_dt_c(g_row, z_row, dt_row, c_row, t, s_gl, s_zl, s_tl, s_cl, mask_d, mask_n, bias,
                  HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # fmt: skip
    """Step t of the adjoint: dy_t = dout_t ⊙ silu(z_t) and Δ'_t as fp32 [BLOCK_D], C_t as fp32 [BLOCK_N]."""
    dy = tl.load(g_row + t * s_gl, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z_t = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
        dy = dy * z_t * tl.sigmoid(z_t)
    dt = _load_dt(dt_row, t, s_tl, mask_d, bias, HAS_BIAS, SOFTPLUS)
    c_t = tl.load(c_row + t * s_cl, mask=mask_n, other=0.0).to(tl.float32)
    return dy, dt, c_t


@triton.jit
def _bwd_local_kernel(
    dout_ptr, z_ptr, dt_ptr, A_ptr, C_ptr, bias_ptr, lcarry_ptr, decay_ptr,
    seqlen, dim, dstate,
    s_gb, s_gl, s_gd, s_zb, s_zl, s_zd, s_tb, s_tl, s_td, s_ad, s_an, s_cb, s_cl, s_cn,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Chunk c = 1 + program_id(2): adjoint recurrence from zero carry; store lc_c and the chunk decay P_c.

    Step t-1's inputs are loaded before step t's math (software prefetch, backwards in time).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_local = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn, other=0.0).to(tl.float32)
    a2 = a2 * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    g_row = dout_ptr + pid_b * s_gb + offs_d * s_gd
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    dt_row = dt_ptr + pid_b * s_tb + offs_d * s_td
    c_row = C_ptr + pid_b * s_cb + offs_n * s_cn
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    da_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # log2 of exp(Δ'_{t+1} A)
    log_decay = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    t_begin = (pid_k + 1) * T
    t_end = tl.minimum(t_begin + T, seqlen)
    rows = (g_row, z_row, dt_row, c_row)
    steps = (s_gl, s_zl, s_tl, s_cl)
    dy, dt_t, c_t = _load_dy_dt_c(*rows, t_end - 1, *steps, mask_d, mask_n, bias, HAS_Z, HAS_BIAS, SOFTPLUS)
    for i in range(0, t_end - t_begin):
        t = t_end - 1 - i
        more = t > t_begin  # prefetch step t-1
        m_d, m_n = mask_d & more, mask_n & more
        dy_prev, dt_prev, c_prev = _load_dy_dt_c(*rows, t - 1, *steps, m_d, m_n, bias, HAS_Z, HAS_BIAS, SOFTPLUS)
        da = dt_t[:, None] * a2
        dh = tl.exp2(da_next) * dh + dy[:, None] * c_t[None, :]
        da_next = da
        log_decay += da
        dy, dt_t, c_t = dy_prev, dt_prev, c_prev
    offs = ((pid_b * n_local + pid_k) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    tl.store(lcarry_ptr + offs, tl.exp2(da_next) * dh, mask=mask_dn)
    tl.store(decay_ptr + offs, tl.exp2(log_decay), mask=mask_dn)


@triton.jit
def _reduce_channels(ptr, pid_b, pid_c, n_chunks, dim, offs_d, value, mask_d, DETERMINISTIC: tl.constexpr):
    """Add a per-channel [BLOCK_D] partial: store into (B, n_chunks, D) partials, or atomic_add into (D,)."""
    if DETERMINISTIC:
        tl.store(ptr + (pid_b * n_chunks + pid_c) * dim + offs_d, value, mask=mask_d)
    else:
        tl.atomic_add(ptr + offs_d, value, mask=mask_d, sem="relaxed")


@triton.jit
def _bwd_kernel(
    dout_ptr, u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, states_ptr, carry_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    seqlen, dim, dstate, n_chunks,
    s_gb, s_gl, s_gd, s_ub, s_ul, s_ud, s_tb, s_tl, s_td, s_zb, s_zl, s_zd, s_ad, s_an,
    s_bb, s_bl, s_bn, s_cb, s_cl, s_cn,
    T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_CARRY: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """Gradients of one (batch, BLOCK_D channels, chunk): [T, BLOCK_D] tiles, a loop over states n with two scans.

    Reductions: with DETERMINISTIC, this program's partial sums are stored (dB/dC into (D/BLOCK_D, B, L, N), dA into
    (B, n_chunks, D, N), dD/d delta_bias into (B, n_chunks, D)) and summed by the caller; otherwise they are
    fp32 ``atomic_add``-ed into (B, L, N), (D, N) and (D,) buffers.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, T)
    offs_t = pid_c * T + offs_r
    mask_d = offs_d < dim
    mask_t = offs_t < seqlen
    mask_td = mask_t[:, None] & mask_d[None, :]
    mask_next = (offs_r < T - 1)[:, None] & (offs_t + 1 < seqlen)[:, None] & mask_d[None, :]

    # Only Δ', Δ'_{t+1}, Δ'u, dy and three accumulators stay live across the loop over states; u, Δ, dout and z are
    # re-read for the epilogue (from L2) to keep register pressure down.
    u_tile = u_ptr + pid_b * s_ub + offs_t[:, None] * s_ul + offs_d[None, :] * s_ud
    dt_tile = dt_ptr + pid_b * s_tb + offs_t[:, None] * s_tl + offs_d[None, :] * s_td
    g_tile = dout_ptr + pid_b * s_gb + offs_t[:, None] * s_gl + offs_d[None, :] * s_gd
    z_tile = z_ptr + pid_b * s_zb + offs_t[:, None] * s_zl + offs_d[None, :] * s_zd
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_tile, mask=mask_td, other=0.0).to(tl.float32)
    dt_next = tl.load(dt_tile + s_tl, mask=mask_next, other=0.0).to(tl.float32)  # Δ_{t+1}
    if HAS_BIAS:
        dt += bias[None, :]
        dt_next += bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
        dt_next = _softplus(dt_next)
    dt = tl.where(mask_td, dt, 0.0)
    dt_next = tl.where(mask_next, dt_next, 0.0)  # exp(0·A) = 1 past the chunk end: the carry K_c covers it
    dtu = dt * tl.load(u_tile, mask=mask_td, other=0.0).to(tl.float32)
    dy = tl.load(g_tile, mask=mask_td, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_tile, mask=mask_td, other=0.0).to(tl.float32)
        dy = dy * z * tl.sigmoid(z)

    y = tl.zeros([T, BLOCK_D], dtype=tl.float32)  # pre-gate Σ_n C h, only needed for dz
    d_dtu = tl.zeros([T, BLOCK_D], dtype=tl.float32)  # Σ_n dh B
    d_dt = tl.zeros([T, BLOCK_D], dtype=tl.float32)  # Σ_n g A
    state_base = (pid_b * n_chunks + pid_c) * dim * dstate + offs_d * dstate
    for n in range(0, dstate):
        a_n = tl.load(A_ptr + offs_d * s_ad + n * s_an, mask=mask_d, other=0.0).to(tl.float32)
        a2_n = a_n * 1.4426950408889634
        b_n = tl.load(B_ptr + pid_b * s_bb + offs_t * s_bl + n * s_bn, mask=mask_t, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pid_b * s_cb + offs_t * s_cl + n * s_cn, mask=mask_t, other=0.0).to(tl.float32)
        h0 = tl.load(states_ptr + state_base + n, mask=mask_d, other=0.0)
        # forward: h_t = dA_t h_{t-1} + x_t from H_c
        da = tl.exp2(dt * a2_n[None, :])
        x = dtu * b_n[:, None]
        da_cum, h = tl.associative_scan((da, x), 0, _affine_combine)
        h = h + da_cum * h0[None, :]
        if HAS_Z:
            y += h * c_n[:, None]
        d_c = tl.sum(h * dy, axis=1)
        # adjoint: dh_t = C_t dy_t + dA_{t+1} dh_{t+1}, then the carry from later chunks
        da_next = tl.exp2(dt_next * a2_n[None, :])
        dh_cum, dh = tl.associative_scan((da_next, c_n[:, None] * dy), 0, _affine_combine, reverse=True)
        if HAS_CARRY:
            k_c = tl.load(carry_ptr + state_base + n, mask=mask_d, other=0.0)
            dh = dh + dh_cum * k_c[None, :]
        d_dtu += dh * b_n[:, None]
        d_b = tl.sum(dh * dtu, axis=1)
        g = dh * (h - x)  # = dh ⊙ dA_t ⊙ h_{t-1}
        d_dt += g * a_n[None, :]
        d_a = tl.sum(g * dt, axis=0)
        if DETERMINISTIC:
            bc_offs = ((pid_d * tl.num_programs(0) + pid_b) * seqlen + offs_t) * dstate + n
            tl.store(dB_ptr + bc_offs, d_b, mask=mask_t)
            tl.store(dC_ptr + bc_offs, d_c, mask=mask_t)
            tl.store(dA_ptr + state_base + n, d_a, mask=mask_d)
        else:
            bc_offs = (pid_b * seqlen + offs_t) * dstate + n
            tl.atomic_add(dB_ptr + bc_offs, d_b, mask=mask_t, sem="relaxed")
            tl.atomic_add(dC_ptr + bc_offs, d_c, mask=mask_t, sem="relaxed")
            tl.atomic_add(dA_ptr + offs_d * dstate + n, d_a, mask=mask_d, sem="relaxed")

    u = tl.load(u_tile, mask=mask_td, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(Dv_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        du = dy * d_skip[None, :] + d_dtu * dt
        _reduce_channels(dD_ptr, pid_b, pid_c, n_chunks, dim, offs_d, tl.sum(dy * u, axis=0), mask_d, DETERMINISTIC)
    else:
        du = d_dtu * dt
    d_dt += d_dtu * u
    if SOFTPLUS:
        dt_raw = tl.load(dt_tile, mask=mask_td, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw += bias[None, :]
        d_dt = d_dt * tl.sigmoid(dt_raw)  # softplus'(x) = σ(x)
    if HAS_BIAS:
        _reduce_channels(dbias_ptr, pid_b, pid_c, n_chunks, dim, offs_d, tl.sum(d_dt, axis=0), mask_d, DETERMINISTIC)
    out_offs = (pid_b * seqlen + offs_t[:, None]) * dim + offs_d[None, :]  # contiguous (B, L, D) gradients
    tl.store(du_ptr + out_offs, du.to(du_ptr.dtype.element_ty), mask=mask_td)
    tl.store(ddt_ptr + out_offs, d_dt.to(ddt_ptr.dtype.element_ty), mask=mask_td)
    if HAS_Z:
        if HAS_D:
            y += d_skip[None, :] * u
        dout = tl.load(g_tile, mask=mask_td, other=0.0).to(tl.float32)
        z = tl.load(z_tile, mask=mask_td, other=0.0).to(tl.float32)
        sig_z = tl.sigmoid(z)
        dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))  # d silu(z)/dz = σ(z)(1 + z(1 - σ(z)))
        tl.store(dz_ptr + out_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask_td)


def _interpreting() -> bool:
    """True when this module's kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


INTERPRET: bool = _interpreting()
"""Whether the kernels run in Triton's CPU interpreter (then CPU tensors are accepted)."""


def _device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device), or nothing for the interpreter's CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_device(x: torch.Tensor) -> None:
    if x.is_cuda or (INTERPRET and x.device.type == "cpu"):
        return
    hint = "move the tensors to CUDA" if not INTERPRET else "use CPU or CUDA tensors"
    raise ValueError(
        f"selective_scan_triton: tensors are on {x.device}, which the Triton kernels cannot run on; {hint} "
        "(CPU tensors work only in Triton's interpreter: set TRITON_INTERPRET=1 before importing "
        "zigma.ops.triton_scan), or use backend='torch'"
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, dim: int, n_chunks: int, sm_count: int, config: TritonScanConfig) -> int:
    """Forward programs along L: ``config.l_split``, or enough that B · D/fwd_block_d · S fills the GPU.

    The target is ``fwd_programs_per_sm`` resident programs on each of ``sm_count`` SMs (the occupancy the compile
    report gives the forward kernel); 1 when the batch already fills it, at most one split per chunk.
    """
    if config.l_split > 0:
        return min(config.l_split, n_chunks)
    programs = batch * triton.cdiv(dim, config.fwd_block_d)
    target = config.fwd_programs_per_sm * sm_count
    return max(1, min(n_chunks, target // programs))


def _opt(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A tensor argument for a kernel pointer that the kernel never dereferences when absent."""
    return x if x is not None else like


def _strides3(x: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(x.stride()) if x is not None else (0, 0, 0)


def _block_n(dstate: int) -> int:
    return max(2, triton.next_power_of_2(dstate))


def launch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config, *, store_states, sm_count):
    """Launch the forward kernels on channel-last inputs: u, delta, z (B, L, D); B, C (B, L, N).

    Returns out (B, L, D) contiguous in u's dtype, last_state (B, D, N) fp32 and the chunk-start states
    (B, ceil(L / chunk_size), D, N) fp32, or (B, 0, D, N) without ``store_states``. The tensors may be ``meta``
    tensors (``benchmarks/triton_compile_report.py`` records the launches that way).
    """
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    chunk = config.chunk_size
    n_chunks = triton.cdiv(seqlen, chunk)
    n_split = _num_splits(batch, dim, n_chunks, sm_count, config)
    chunks_per_split = triton.cdiv(n_chunks, n_split)
    n_split = triton.cdiv(n_chunks, chunks_per_split)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty(batch, seqlen, dim, device=u.device, dtype=u.dtype)
    last_state = torch.empty(batch, dim, dstate, **f32)
    states = torch.empty(batch, n_chunks if store_states else 0, dim, dstate, **f32)
    n_dblk = triton.cdiv(dim, config.fwd_block_d)
    common = dict(
        BLOCK_D=config.fwd_block_d,
        BLOCK_N=_block_n(dstate),
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        num_warps=config.fwd_warps,
    )
    with _device_guard(u):
        hstart = last_state  # placeholder pointer when there is one split
        if n_split > 1:
            hend = torch.empty(batch, n_split - 1, dim, dstate, **f32)
            decay = torch.empty_like(hend)
            _fwd_local_kernel[(batch, n_dblk, n_split - 1)](
                u, delta, A, B, _opt(delta_bias, A), hend, decay,
                seqlen, dim, dstate, chunks_per_split * chunk,
                *u.stride(), *delta.stride(), *A.stride(), *B.stride(),
                **common,
            )  # fmt: skip
            hstart = torch.empty(batch, n_split, dim, dstate, **f32)
            _state_passing_kernel[(batch, triton.cdiv(dim * dstate, _PASS_BLOCK))](
                hend, decay, hstart, n_split, dim * dstate, BLOCK=_PASS_BLOCK, REVERSE=False
            )
        _fwd_kernel[(batch, n_dblk, n_split)](
            u, delta, _opt(z, u), A, B, C, _opt(D, A), _opt(delta_bias, A), hstart, out,
            states if store_states else last_state, last_state,
            seqlen, dim, dstate, n_chunks, chunks_per_split * chunk,
            *u.stride(), *delta.stride(), *_strides3(z), *A.stride(), *B.stride(), *C.stride(),
            out.stride(0), out.stride(1),
            T=chunk, HAS_D=D is not None, HAS_Z=z is not None, HAS_HSTART=n_split > 1, STORE_STATES=store_states,
            **common,
        )  # fmt: skip
    return out, last_state, states


def launch_backward(dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, config):
    """Launch the backward kernels (channel-last, as :func:`launch_forward`; ``states`` from it).

    Returns du, ddelta, dz (B, L, D) contiguous in their inputs' dtypes; dA (D, N); dB, dC (B, L, N) contiguous;
    dD, d delta_bias (D,). Absent inputs (D, z, delta_bias) get empty (0,) tensors.
    """
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    n_chunks = states.shape[1]
    chunk = config.chunk_size
    if n_chunks != triton.cdiv(seqlen, chunk):
        raise ValueError(
            f"selective_scan_triton backward: {n_chunks} saved chunk states for L={seqlen}, chunk_size={chunk} "
            "(the forward ran without storing states: no gradient was expected)"
        )
    f32 = dict(device=u.device, dtype=torch.float32)
    n_dblk = triton.cdiv(dim, config.bwd_block_d)
    du = torch.empty(batch, seqlen, dim, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(batch, seqlen, dim, device=u.device, dtype=delta.dtype)
    dz = torch.empty(batch, seqlen, dim, device=u.device, dtype=z.dtype) if z is not None else u.new_empty(0)
    if config.deterministic:  # per-program partial sums, reduced below by torch (no atomics)
        dA = torch.empty(batch, n_chunks, dim, dstate, **f32)
        dB = torch.empty(n_dblk, batch, seqlen, dstate, **f32)
        dC = torch.empty(n_dblk, batch, seqlen, dstate, **f32)
        dD = torch.empty(batch, n_chunks, dim, **f32) if D is not None else A.new_empty(0)
        dbias = torch.empty(batch, n_chunks, dim, **f32) if delta_bias is not None else A.new_empty(0)
    else:
        dA = torch.zeros(dim, dstate, **f32)
        dB = torch.zeros(batch, seqlen, dstate, **f32)
        dC = torch.zeros(batch, seqlen, dstate, **f32)
        dD = torch.zeros(dim, **f32) if D is not None else A.new_empty(0)
        dbias = torch.zeros(dim, **f32) if delta_bias is not None else A.new_empty(0)
    common = dict(
        T=chunk,
        BLOCK_D=config.bwd_block_d,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        num_warps=config.bwd_warps,
    )
    with _device_guard(u):
        carry = states  # placeholder pointer when there is one chunk
        if n_chunks > 1:
            lcarry = torch.empty(batch, n_chunks - 1, dim, dstate, **f32)
            decay = torch.empty_like(lcarry)
            _bwd_local_kernel[(batch, n_dblk, n_chunks - 1)](
                dout, _opt(z, u), delta, A, C, _opt(delta_bias, A), lcarry, decay,
                seqlen, dim, dstate,
                *dout.stride(), *_strides3(z), *delta.stride(), *A.stride(), *C.stride(),
                BLOCK_N=_block_n(dstate), **common,
            )  # fmt: skip
            carry = torch.empty(batch, n_chunks, dim, dstate, **f32)
            _state_passing_kernel[(batch, triton.cdiv(dim * dstate, _PASS_BLOCK))](
                lcarry, decay, carry, n_chunks, dim * dstate, BLOCK=_PASS_BLOCK, REVERSE=True
            )
        _bwd_kernel[(batch, n_dblk, n_chunks)](
            dout, u, delta, _opt(z, u), A, B, C, _opt(D, A), _opt(delta_bias, A), states, carry,
            du, ddelta, dz if z is not None else du, dA, dB, dC, dD if D is not None else dA,
            dbias if delta_bias is not None else dA,
            seqlen, dim, dstate, n_chunks,
            *dout.stride(), *u.stride(), *delta.stride(), *_strides3(z), *A.stride(), *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_CARRY=n_chunks > 1, DETERMINISTIC=config.deterministic, **common,
        )  # fmt: skip
    if config.deterministic:
        dA, dB, dC = dA.sum((0, 1)), dB.sum(0), dC.sum(0)
        dD = dD.sum((0, 1)) if D is not None else dD
        dbias = dbias.sum((0, 1)) if delta_bias is not None else dbias
    return (
        du,
        ddelta,
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.to(D.dtype) if D is not None else dD,
        dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else dbias,
    )


_FWD_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, int[] config, bool store_states) -> (Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "Tensor states, bool delta_softplus, int[] config) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("zigma::selective_scan_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config, store_states):
    """:func:`launch_forward` as an op; ``config`` is ``TritonScanConfig.to_ints()``."""
    _check_device(u)
    cfg, sm_count = TritonScanConfig.from_ints(config), _sm_count(u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg)
    return launch_forward(*args, store_states=store_states, sm_count=sm_count)


@_selective_scan_fwd.register_fake
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config, store_states):
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    chunk = TritonScanConfig.from_ints(config).chunk_size
    n_chunks = (seqlen + chunk - 1) // chunk if store_states else 0
    return (
        u.new_empty(batch, seqlen, dim),
        u.new_empty(batch, dim, dstate, dtype=torch.float32),
        u.new_empty(batch, n_chunks, dim, dstate, dtype=torch.float32),
    )


@torch.library.custom_op("zigma::selective_scan_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, config):
    """:func:`launch_backward` as an op; ``config`` is ``TritonScanConfig.to_ints()``."""
    _check_device(u)
    cfg = TritonScanConfig.from_ints(config)
    return launch_backward(dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, cfg)


@_selective_scan_bwd.register_fake
def _selective_scan_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, config):
    batch, seqlen, dim = u.shape
    dstate = A.shape[1]
    return (
        u.new_empty(batch, seqlen, dim),
        delta.new_empty(batch, seqlen, dim),
        A.new_empty(dim, dstate),
        B.new_empty(batch, seqlen, dstate),
        C.new_empty(batch, seqlen, dstate),
        D.new_empty(dim) if D is not None else A.new_empty(0),
        z.new_empty(batch, seqlen, dim) if z is not None else u.new_empty(0),
        delta_bias.new_empty(dim) if delta_bias is not None else A.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, config, _ = inputs
    _, last_state, states = output
    ctx.mark_non_differentiable(last_state, states)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
    ctx.delta_softplus = delta_softplus
    ctx.config = config


def _backward(ctx, dout, _d_last_state, _d_states):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, states, ctx.delta_softplus, ctx.config
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
        None,
        None,
    )


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _channel_last(x: torch.Tensor) -> torch.Tensor:
    """(B, D, L) -> (B, L, D) view with unit channel stride; copies only when the channel stride is not 1."""
    x = x.transpose(1, 2)
    return x if x.stride(2) == 1 else x.contiguous()


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    config: TritonScanConfig | None = None,
    chunk_size: int | None = None,
    l_split: int | None = None,
):
    """Fused Triton selective scan with mamba_ssm's contract (see :mod:`zigma.ops.reference` and the module docstring).

    Args:
        u, delta: (B, D, L) fp32/fp16/bf16; channel-last memory (``stride(1) == 1``) avoids a copy.
        A: (D, N) real, fp32.   B, C: (B, N, L) or (B, 1, N, L).   D, delta_bias: (D,) fp32.   z: (B, D, L) gate.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return h_{L-1}.
        config: tiling, warps, splits and the deterministic switch (:class:`TritonScanConfig`; default
            ``TritonScanConfig()``).
        chunk_size, l_split: shorthands overriding ``config.chunk_size`` / ``config.l_split``.

    Chunk-start states for the backward are written only when a gradient can flow (grad mode on and an input
    requiring grad); under ``torch.no_grad()`` (sampling) they are neither allocated nor written.

    Returns:
        out (B, D, L) in u's dtype (a view of a channel-last buffer), and with ``return_last_state`` also
        last_state (B, D, N) fp32, through which no gradient flows.

    Raises:
        ValueError: on shapes outside the contract, a complex A, grouped B/C, or tensors the kernels cannot run on.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan_triton: u must be (B, D, L), got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if seqlen == 0:
        raise ValueError("selective_scan_triton: L = 0 (empty sequence)")
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"selective_scan_triton: u.dtype={u.dtype} is not one of float32, float16, bfloat16")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"selective_scan_triton: A must be real (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    config = config if config is not None else DEFAULT_CONFIG
    if not isinstance(config, TritonScanConfig):
        raise ValueError(f"selective_scan_triton: config must be a TritonScanConfig, got {type(config).__name__}")
    overrides = {k: v for k, v in (("chunk_size", chunk_size), ("l_split", l_split)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)  # validated by TritonScanConfig.__post_init__
    bc = []
    for name, x in (("B", B), ("C", C)):
        if x.dim() == 4:
            if x.shape[1] != 1:
                raise ValueError(
                    f"selective_scan_triton: grouped {name} with {x.shape[1]} groups is not supported "
                    "(only (B, N, L) or (B, 1, N, L)); use backend='torch' or 'cuda'"
                )
            x = x.squeeze(1)
        if tuple(x.shape) != (batch, dstate, seqlen):
            raise ValueError(
                f"selective_scan_triton: {name} must be (B, N, L) = {(batch, dstate, seqlen)}, got {tuple(x.shape)}"
            )
        bc.append(x.transpose(1, 2))  # (B, L, N) view, strides passed to the kernels
    for name, x in (("delta", delta), ("z", z)):
        if x is not None and tuple(x.shape) != (batch, dim, seqlen):
            raise ValueError(
                f"selective_scan_triton: {name} must be (B, D, L) = {(batch, dim, seqlen)}, got {tuple(x.shape)}"
            )
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and tuple(x.shape) != (dim,):
            raise ValueError(f"selective_scan_triton: {name} must be (D,) = ({dim},), got {tuple(x.shape)}")
    for name, x in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f"selective_scan_triton: {name} is on {x.device} but u is on {u.device}")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    out, last_state, _ = _selective_scan_fwd(
        _channel_last(u),
        _channel_last(delta),
        A,
        bc[0],
        bc[1],
        D,
        _channel_last(z) if z is not None else None,
        delta_bias,
        bool(delta_softplus),
        config.to_ints(),
        needs_grad,
    )
    out = out.transpose(1, 2)  # (B, D, L) view of the (B, L, D) buffer
    return (out, last_state) if return_last_state else out
