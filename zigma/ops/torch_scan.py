"""Exact, memory-lean selective scan in pure PyTorch (the ``torch`` backend; CPU default and GPU fallback).

Same contract and formulas as :mod:`zigma.ops.reference`. What differs is how the work is laid out:

* **Time-major, channel-last blocks.** Internally every per-state tensor is ``(L_blk, B, N, D)``: one time step
  is one contiguous ``(B, N, D)`` slab, so the recurrence ``h_t = dA_t ⊙ h_{t-1} + x_t`` is a single in-place
  ``addcmul_`` per step with no autograd graph, and the contractions over ``N`` are batched matmuls.
* **Blocks along L.** ``exp(Δ'⊗A)`` and ``(Δ'u)⊗B`` are materialised only for ``L_blk`` steps at a time
  (sized to stay cache-resident); the whole ``(L, B, N, D)`` volume is held only where it is kept (next point).
* **Recompute instead of store, unless the volume is small.** Forward keeps the block-start states
  ``(n_blocks, B, N, D)`` and the pre-gate output ``y``; backward re-runs each block from its start state, then runs
  the adjoint recurrence backwards in time (below). On the CPU path, when a backward will follow and the volume
  ``L·B·N·D`` is at most ``_KEEP_STATES_ELEMENTS`` (8 M elements: 2 x 32 MiB in fp32 per scan, held from its forward
  to its backward), forward instead keeps dA = exp(Δ'⊗A) and h of every step, written block by block as they are
  computed, and backward reads them instead of re-running the blocks (bit-identical gradients; with the other
  backward changes of issue 17, a quickstart training step takes 1.34x less CPU: ``benchmarks/RESULTS.md``).
  Larger volumes, inference and the chunk-parallel path recompute:

      dh_t  = C_t ⊗ dy_t + dA_{t+1} ⊙ dh_{t+1}
      dC_t  = Σ_d dy_t[d] h_t[:, d]           d(Δ'u)_t = Σ_n dh_t[n] B_t[n]      dB_t = Σ_d dh_t[:, d] (Δ'u)_t[d]
      g_t   = dh_t ⊙ dA_t ⊙ h_{t-1}           dΔ'_t   += Σ_n g_t[n] A[n]          dA    = Σ_{t,b} g_t ⊙ Δ'_t

  so peak memory is O(B·L·D + B·L_blk·D·N) instead of O(B·L·D·N) (with kept states, O(B·L·D·N) up to the limit).
* **Two ways to run a block, chosen by device.** On CPU the recurrence inside a block is a Python loop of in-place
  ``addcmul_`` over cache-resident ``(B, N, D)`` slabs, with blocks sized by ``_BLOCK_ELEMENTS`` (fastest there:
  ``benchmarks/scan_cpu.py``). Elsewhere (CUDA) that sizing would shrink blocks to one step at training batch sizes
  (B=32, D=1536, N=16 is already 0.8 M elements per step), i.e. ~10 kernel launches per time step. There blocks
  are ``_PARALLEL_CHUNK`` steps long whatever the batch, and both recurrences inside a block are solved by
  :func:`_linear_scan`, an odd-even (cyclic) reduction with ⌈log2 T⌉ levels of whole-tensor ops: the Python loop
  runs ceil(L / T) times per pass, independent of B, D and N. It multiplies only decays exp(Δ'A) ≤ 1 (never
  divides by a cumulative product, so extreme Δ or very negative A cannot overflow) and is exact up to rounding
  order. ``chunk_parallel=True`` forces this path on CPU (tests; CI has no GPU).

Forward and backward are registered as ``torch.ops.zigma.selective_scan_torch_fwd`` / ``selective_scan_torch_bwd``
(``torch.library.custom_op`` with fake and autograd registrations, like :mod:`zigma.ops.triton_scan`), so
``torch.compile`` keeps each scan as one opaque node instead of tracing the Python time loops: a model using this
backend compiles with ``fullgraph=True`` (``tests/zigma/test_compile.py``). Eager results are those of the former
``autograd.Function``, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigma.ops.reference import compute_dtype

# CPU: elements of one (L_blk, B, N, D) block tensor: ~2 MiB in fp32, so the 4-5 live block tensors stay in cache.
_BLOCK_ELEMENTS = 1 << 19
# CPU: the forward keeps dA = exp(Δ'⊗A) and the states h of every step for backward (which then skips recomputing
# them) when the (L, B, N, D) volume has at most this many elements: two such tensors (64 MiB in fp32, 128 MiB in fp64
# at the limit) live from each scan's forward to its backward. Quickstart (L=64, B=32, N=8, D=256): 4 M elements,
# 32 MiB per scan, 192 MiB for its 6 layers. Larger volumes, and the chunk-parallel path, recompute.
_KEEP_STATES_ELEMENTS = 1 << 23
# Chunk-parallel path (every device but CPU): steps per block, whatever the batch. Besides the O(B·L·D) tensors and
# the L/T saved block-start states, at most ~5 block tensors of T·B·N·D elements are live (backward: dA, h, the
# reversed adjoint input and multipliers, scan temporaries), 200 MB each in fp32 at B=32, D=1536, N=16.
_PARALLEL_CHUNK = 64


def _block_length(batch: int, n_state: int, dim: int, seqlen: int, chunk_parallel: bool = False) -> int:
    """Steps per block: fixed on the chunk-parallel path, else as many as fit ``_BLOCK_ELEMENTS`` (at least 1)."""
    if chunk_parallel:
        return max(1, min(seqlen, _PARALLEL_CHUNK))
    per_step = batch * n_state * dim
    return max(1, min(seqlen, _BLOCK_ELEMENTS // per_step))


def _keeps_states(batch: int, n_state: int, dim: int, seqlen: int, chunk_parallel: bool, needs_grad: bool) -> bool:
    """Whether the forward keeps every step's dA and h for backward: on the CPU path, for a backward, up to
    ``_KEEP_STATES_ELEMENTS``."""
    return needs_grad and not chunk_parallel and seqlen * batch * n_state * dim <= _KEEP_STATES_ELEMENTS


def default_chunk_parallel(device: torch.device) -> bool:
    """The chunk-parallel block path everywhere but on CPU, where the sequential in-block loop is faster."""
    return device.type != "cpu"


def _time_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, D, L) -> contiguous (L, B, D) in ``dtype`` (a free view when x is channel-last in memory)."""
    return x.permute(2, 0, 1).to(dtype).contiguous()


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``h_0 = b_0,  h_t = a_{t-1} ⊙ h_{t-1} + b_t`` (t = 1..T-1) along dim 0, in place in ``b``.

    Odd-even reduction: pairing steps (2j, 2j+1) gives the same recurrence over the odd steps alone,
    ``h_{2j+1} = (a_{2j} a_{2j-1}) h_{2j-1} + (a_{2j} b_{2j} + b_{2j+1})``, solved recursively; then each even step
    is one update from the odd step before it. ⌈log2 T⌉ levels of whole-tensor ops on halving views along dim 0
    (contiguous slabs in the time-major layout); temporaries total < T slices of each of a and b.

    Args:
        a: (T-1, ...) multipliers (a[t-1] carries h_{t-1} into h_t).   b: (T, ...) inputs, overwritten by h.

    Returns:
        ``b``, now holding h (T, ...).
    """
    n_odd = b.shape[0] // 2
    if n_odd == 0:
        return b
    a_even, a_odd = a[0::2], a[1::2]  # a_{2j} (n_odd of them), a_{2j+1}
    b_pairs = torch.addcmul(b[1::2], a_even, b[0::2][:n_odd])  # a_{2j} b_{2j} + b_{2j+1}
    h_odd = _linear_scan(a_even[1:] * a_odd[: n_odd - 1], b_pairs)  # h_{2j+1}
    b[1::2] = h_odd
    n_next = (b.shape[0] - 1) // 2  # even steps 2j >= 2, each following h_{2j-1}
    b[2::2].addcmul_(a_odd[:n_next], h_odd[:n_next])
    return b


def _states(dt, dtu, a_nd, b_ln, h0, chunk_parallel: bool = False, out=None):
    """Run the recurrence ``h_t = dA_t ⊙ h_{t-1} + (Δ'u)_t ⊗ B_t`` over one block.

    Args:
        dt, dtu: (T, B, D) Δ' and Δ'·u.   a_nd: (N, D) = Aᵀ.   b_ln: (T, B, N).   h0: (B, N, D) state before the block.
        chunk_parallel: solve with :func:`_linear_scan` (log-depth tensor ops) instead of a loop over the T steps.
        out: None, or contiguous (T, B, N, D) buffers (dA, h) to write into instead of fresh tensors.

    Returns:
        dA: (T, B, N, D) = exp(Δ'⊗A);  h: (T, B, N, D) all states of the block.
    """
    d_a_out, h_out = (None, None) if out is None else out
    d_a = torch.mul(dt[:, :, None, :], a_nd, out=d_a_out).exp_()
    h = torch.mul(dtu[:, :, None, :], b_ln[..., None], out=h_out)
    h[0].addcmul_(d_a[0], h0)
    if chunk_parallel:
        return d_a, _linear_scan(d_a[1:], h)
    steps, decays = h.unbind(0), d_a.unbind(0)  # per-step views made once, not by indexing in the loop
    for t in range(1, len(steps)):
        steps[t].addcmul_(decays[t], steps[t - 1])
    return d_a, h


def _adjoint_states(dec, c_blk, dy_blk, carry, chunk_parallel: bool, out=None) -> torch.Tensor:
    """Run the adjoint recurrence ``dh_t = C_t ⊗ dy_t + dA_{t+1} ⊙ dh_{t+1}`` backwards over one block.

    Args:
        dec: (T, B, N, D) dA of the block.   c_blk: (T, B, N) C.   dy_blk: (T, B, D) dy.
        carry: (B, N, D) dA_{T} ⊙ dh_{T} from the block after this one (zeros for the last block).
        chunk_parallel: solve as :func:`_linear_scan` in reversed time instead of a loop over the T steps.
        out: None, or a contiguous (T, B, N, D) buffer for dh on the loop path (ignored on the chunk-parallel one).

    Returns:
        dh (T, B, N, D).
    """
    if chunk_parallel:  # built reversed (flipping the small C and dy, not a block tensor), multipliers dA_{t+1}
        dh_rev = c_blk.flip(0)[..., None] * dy_blk.flip(0)[:, :, None, :]
        dh_rev[0].add_(carry)
        return _linear_scan(dec[1:].flip(0), dh_rev).flip(0)
    dh = torch.mul(c_blk[..., None], dy_blk[:, :, None, :], out=out)
    dh[-1].add_(carry)
    steps, decays = dh.unbind(0), dec.unbind(0)
    for t in range(len(steps) - 2, -1, -1):
        steps[t].addcmul_(decays[t + 1], steps[t + 1])
    return dh


def _check_supported(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if A.is_complex() or any(m.dim() == 4 and m.shape[1] != 1 for m in (B, C)) or B.dim() == 2:
        raise ValueError("the torch scan backend supports real A and input-dependent B, C of shape (B, N, L)")


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, blk, chunk_parallel=False, keep_states=False):
    """Forward over blocks of ``blk`` steps; B, C are (B, N, L). Returns the six outputs of the forward op; with
    ``keep_states`` the last two are dA and h of every step, (L, B, N, D), written block by block as they are
    computed (else empty)."""
    ct = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]
    u_t = _time_major(u, ct)  # (L, B, D)
    dt = _time_major(delta, ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    dtu = dt * u_t
    a_nd = A.to(ct).t().contiguous()  # (N, D)
    b_t = B.to(ct).permute(2, 0, 1).contiguous()  # (L, B, N)
    c_t = C.to(ct).permute(2, 0, 1).contiguous()

    starts = list(range(0, seqlen, blk))
    block_states = u_t.new_empty(len(starts), batch, n_state, dim)
    y = u_t.new_empty(seqlen, batch, dim)
    h_last = u_t.new_zeros(batch, n_state, dim)
    kept_shape = (seqlen, batch, n_state, dim) if keep_states else (0,)
    kept_decays, kept_states = u_t.new_empty(kept_shape), u_t.new_empty(kept_shape)
    for k, l0 in enumerate(starts):
        l1 = min(l0 + blk, seqlen)
        block_states[k] = h_last
        out = (kept_decays[l0:l1], kept_states[l0:l1]) if keep_states else None
        _, h = _states(dt[l0:l1], dtu[l0:l1], a_nd, b_t[l0:l1], h_last, chunk_parallel, out)
        torch.matmul(c_t[l0:l1, :, None, :], h, out=y[l0:l1, :, None, :])
        h_last = h[-1].clone()
    if D is not None:
        y.addcmul_(u_t, D.to(ct))
    out = y if z is None else y * F.silu(_time_major(z, ct))
    # (B, D, N) fp32 (fp64 for fp64 inputs), as mamba_ssm; a fresh contiguous buffer even when N or D is 1
    last_state = h_last.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    # y (pre-gate) is needed by backward only for dz; without z, out may *be* y, and an op output may not alias another
    pre_gate = y if z is not None else u_t.new_empty(0)
    return out.to(u.dtype), last_state, block_states, pre_gate, kept_decays, kept_states


def _scan_backward(dout_t, u, delta, A, B, C, D, z, delta_bias, block_states, y, delta_softplus, blk,
                   chunk_parallel=False, kept_decays=None, kept_states=None):  # fmt: skip
    """Gradients from dout_t (L, B, D); B, C are (B, N, L). Returns the eight outputs of the backward op.

    ``kept_decays``, ``kept_states``: the forward's dA and h of every step (L, B, N, D), read (never written) instead
    of recomputed from the block-start states; None to recompute."""
    ct = block_states.dtype
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]

    u_t = _time_major(u, ct)
    dt_raw = _time_major(delta, ct)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(ct)
    dt = F.softplus(dt_raw) if delta_softplus else dt_raw
    dtu = dt * u_t
    a_nd = A.to(ct).t().contiguous()
    b_t = B.to(ct).permute(2, 0, 1).contiguous()
    c_t = C.to(ct).permute(2, 0, 1).contiguous()

    dout_t = dout_t.to(ct).contiguous()
    dz = None
    if z is not None:
        z_t = _time_major(z, ct)
        sig = torch.sigmoid(z_t)
        silu = z_t * sig
        slope = torch.rsub(sig, 1).mul_(z_t).add_(1)  # d silu(z)/dz = σ(z)(1 + z(1 - σ(z)))
        dz = torch.mul(dout_t, y).mul_(sig).mul_(slope)  # in place: fewer fresh (L, B, D) buffers, same rounding
        dy = dout_t * silu
    else:
        dy = dout_t
    d_d = (dy * u_t).sum((0, 1)) if D is not None else None
    du = dy * D.to(ct) if D is not None else torch.zeros_like(u_t)

    d_dtu = torch.empty_like(u_t)
    d_dt = torch.empty_like(u_t)
    d_b = torch.empty_like(b_t)
    d_c = torch.empty_like(c_t)
    d_a = torch.zeros_like(a_nd)
    carry = u_t.new_zeros(batch, n_state, dim)  # dA_{l1} ⊙ dh_{l1}, from the block after this one
    starts = list(range(0, seqlen, blk))
    work = dh_buf = None
    for k in reversed(range(len(starts))):
        l0 = starts[k]
        l1 = min(l0 + blk, seqlen)
        h0 = block_states[k]
        if kept_states is not None:
            dec, h = kept_decays[l0:l1], kept_states[l0:l1]
        else:
            dec, h = _states(dt[l0:l1], dtu[l0:l1], a_nd, b_t[l0:l1], h0, chunk_parallel)
        if work is None or work.shape != h.shape:  # reused by every block of the same length
            work = torch.empty_like(h)  # products before a sum over D
            dh_buf = None if chunk_parallel else torch.empty_like(h)  # dh, then g (the loop path)
        dy_blk = dy[l0:l1]
        # dC_t[n] = Σ_d h_t[n, d] dy_t[d]  (a product and a sum over the contiguous D axis: ~5x faster on CPU than
        # the equivalent batched (N, D) @ (D, 1) matmul, and the same on GPUs)
        torch.sum(torch.mul(h, dy_blk[:, :, None, :], out=work), -1, out=d_c[l0:l1])
        # adjoint recurrence, in place: dh_t = C_t ⊗ dy_t + dA_{t+1} ⊙ dh_{t+1}
        dh = _adjoint_states(dec, c_t[l0:l1], dy_blk, carry, chunk_parallel, dh_buf)
        carry = dec[0] * dh[0]
        # d(Δ'u)_t = Σ_n dh_t[n] B_t[n];  dB_t[n] = Σ_d dh_t[n, d] (Δ'u)_t[d]
        torch.matmul(b_t[l0:l1, :, None, :], dh, out=d_dtu[l0:l1, :, None, :])
        torch.sum(torch.mul(dh, dtu[l0:l1, :, None, :], out=work), -1, out=d_b[l0:l1])
        # g_t = dh_t ⊙ dA_t ⊙ h_{t-1} (the gradient w.r.t. Δ'_t A), in dh's storage (dec and h may be the forward's)
        g = dh.mul_(dec)
        g[1:].mul_(h[:-1])
        g[0].mul_(h0)
        # dΔ'_t[d] = Σ_n g_t[n, d] A[d, n];  dA[d, n] = Σ_{t,b} g_t[n, d] Δ'_t[d]
        torch.sum(torch.mul(g, a_nd, out=work), 2, out=d_dt[l0:l1])
        d_a += torch.mul(g, dt[l0:l1, :, None, :], out=work).sum((0, 1))

    d_dt.addcmul_(d_dtu, u_t)
    du.addcmul_(d_dtu, dt)
    if delta_softplus:  # F.softplus's own backward: slope σ(x), but 1 above its threshold 20 (σ(x) there was 2e-9 off)
        d_dt = torch.ops.aten.softplus_backward(d_dt, dt_raw, 1.0, 20.0)
    return (
        du.to(u.dtype),
        d_dt.to(delta.dtype),
        d_a.to(A.dtype),
        d_b.to(B.dtype),
        d_c.to(C.dtype),
        d_d.to(D.dtype) if d_d is not None else A.new_empty(0),
        dz.to(z.dtype) if dz is not None else u.new_empty(0),
        d_dt.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else A.new_empty(0),
    )


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (Dynamo does not trace the Python time loops above, so a model
# using this backend compiles with fullgraph=True), with fake (shape) and autograd registrations, as triton_scan.py.
# Ops never return None or alias an input or another output: absent gradients are empty (0,) tensors, and every
# buffer is returned contiguous and time-major; the (B, D, L) views are taken outside the ops.
# ---------------------------------------------------------------------------------------------------------------
_FWD_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, int block, bool chunk_parallel=False, bool keep_states=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "Tensor block_states, Tensor y, bool delta_softplus, int block, bool chunk_parallel=False, "
    "Tensor? kept_decays=None, Tensor? kept_states=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("zigma::selective_scan_torch_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _selective_scan_torch_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk_parallel=False,
                              keep_states=False):  # fmt: skip
    """u, delta, z (B, D, L); A (D, N); B, C (B, N, L); ``block`` steps per block, each solved chunk-parallel or by a
    step loop. Returns out (L, B, D) in u's dtype, last_state (B, D, N), the block-start states
    (ceil(L / block), B, N, D), the pre-gate y (L, B, D), or an empty (0,) tensor without z, and with
    ``keep_states`` dA and h of every step (L, B, N, D) (else two empty (0,) tensors); all but out in the compute
    dtype (fp32, fp64 for fp64 inputs)."""
    return _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk_parallel, keep_states)


@_selective_scan_torch_fwd.register_fake
def _selective_scan_torch_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk_parallel=False,
                                   keep_states=False):  # fmt: skip
    ct = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]
    n_blocks = (seqlen + block - 1) // block
    kept_shape = (seqlen, batch, n_state, dim) if keep_states else (0,)
    return (
        u.new_empty(seqlen, batch, dim),
        u.new_empty(batch, dim, n_state, dtype=ct),
        u.new_empty(n_blocks, batch, n_state, dim, dtype=ct),
        u.new_empty((seqlen, batch, dim) if z is not None else (0,), dtype=ct),
        u.new_empty(kept_shape, dtype=ct),
        u.new_empty(kept_shape, dtype=ct),
    )


@torch.library.custom_op("zigma::selective_scan_torch_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _selective_scan_torch_bwd(dout, u, delta, A, B, C, D, z, delta_bias, block_states, y, delta_softplus, block,
                              chunk_parallel=False, kept_decays=None, kept_states=None):  # fmt: skip
    """dout (L, B, D); kept_decays, kept_states: the forward's kept dA and h (L, B, N, D), or None to recompute them.
    Returns du, ddelta, dz (L, B, D); dA (N, D); dB, dC (L, B, N); dD, d delta_bias (D,); each contiguous in its
    input's dtype, and an empty (0,) tensor for an absent D, z or delta_bias."""
    return _scan_backward(
        dout, u, delta, A, B, C, D, z, delta_bias, block_states, y, delta_softplus, block, chunk_parallel,
        kept_decays, kept_states,
    )  # fmt: skip


@_selective_scan_torch_bwd.register_fake
def _selective_scan_torch_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, block_states, y, delta_softplus,
                                   block, chunk_parallel=False, kept_decays=None, kept_states=None):  # fmt: skip
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]
    return (
        u.new_empty(seqlen, batch, dim),
        delta.new_empty(seqlen, batch, dim),
        A.new_empty(n_state, dim),
        B.new_empty(seqlen, batch, n_state),
        C.new_empty(seqlen, batch, n_state),
        D.new_empty(dim) if D is not None else A.new_empty(0),
        z.new_empty(seqlen, batch, dim) if z is not None else u.new_empty(0),
        delta_bias.new_empty(dim) if delta_bias is not None else A.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, *options = inputs
    chunk_parallel, keep_states = [*options, False, False][:2]
    _, last_state, block_states, y, kept_decays, kept_states = output
    ctx.mark_non_differentiable(last_state, block_states, y, kept_decays, kept_states)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs (up to 2 volumes)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, block_states, y, kept_decays, kept_states)
    ctx.delta_softplus = delta_softplus
    ctx.block = block
    ctx.chunk_parallel = bool(chunk_parallel)
    ctx.keep_states = bool(keep_states)


def _backward(ctx, dout, _d_last_state, _d_block_states, _d_y, _d_kept_decays, _d_kept_states):
    u, delta, A, B, C, D, z, delta_bias, block_states, y, kept_decays, kept_states = ctx.saved_tensors
    if not ctx.keep_states:
        kept_decays = kept_states = None
    du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_torch_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, block_states, y, ctx.delta_softplus, ctx.block, ctx.chunk_parallel,
        kept_decays, kept_states,
    )  # fmt: skip
    return (
        du.permute(1, 2, 0),  # (L, B, D) -> (B, D, L)
        ddelta.permute(1, 2, 0),
        dA.t(),  # (N, D) -> (D, N)
        dB.permute(1, 2, 0),  # (L, B, N) -> (B, N, L)
        dC.permute(1, 2, 0),
        dD if D is not None else None,
        dz.permute(1, 2, 0) if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
        None,
        None,
        None,
    )


_selective_scan_torch_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *,
    chunk_parallel: bool | None = None,
):  # fmt: skip
    """Pure-PyTorch selective scan with the mamba_ssm contract (see :mod:`zigma.ops.reference`).

    Runs as the custom op ``torch.ops.zigma.selective_scan_torch_fwd`` (backward: ``..._bwd``), so
    ``torch.compile`` treats it as one opaque node. Returns out (B, D, L) in u's dtype (a view of a time-major
    buffer) and, with ``return_last_state``, last_state (B, D, N) fp32 (fp64 for fp64 inputs), without gradient.
    ``chunk_parallel`` picks how blocks are solved (module docstring); None: :func:`default_chunk_parallel` of u's
    device (True on CUDA, False on CPU).

    Raises:
        ValueError: for a complex A, grouped B/C with more than one group, or input-independent (2-dim) B.
    """
    _check_supported(A, B, C)
    if B.dim() == 4:  # grouped (B, G, N, L) with G = 1; autograd unsqueezes dB back
        B = B.squeeze(1)
    if C.dim() == 4:
        C = C.squeeze(1)
    batch, dim, seqlen = u.shape
    if chunk_parallel is None:
        chunk_parallel = default_chunk_parallel(u.device)
    blk = _block_length(batch, A.shape[1], dim, seqlen, chunk_parallel)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias)
    )
    keep = _keeps_states(batch, A.shape[1], dim, seqlen, bool(chunk_parallel), needs_grad)
    out, last_state, *_ = _selective_scan_torch_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), blk, bool(chunk_parallel), keep
    )
    out = out.permute(1, 2, 0)  # (L, B, D) -> (B, D, L)
    return (out, last_state) if return_last_state else out
