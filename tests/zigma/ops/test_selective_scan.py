"""The torch selective-scan backend against the sequential oracle, and the backend dispatcher.

Both block paths of the torch backend are tested on CPU: the sequential in-block loop (the CPU default) and the
chunk-parallel one (the default on CUDA, forced here with ``chunk_parallel=True``).
"""

import math

import pytest
import torch

import zigma.ops.torch_scan as scan_torch
from zigma.ops import available_backends, resolve_backend, selective_scan, selective_scan_ref, selective_scan_torch

# mamba_ssm tests/ops/test_selective_scan.py tolerances (fp32): outputs and input grads; weight grads
RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch=2, dim=6, seqlen=33, n_state=4, dtype=torch.float64, *, has_d=True, has_z=True, has_bias=True,
                channel_last=False, grouped=False, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    if channel_last:  # what the model passes: transposed views of (B, L, D) activations
        u = rnd(batch, seqlen, dim).transpose(1, 2)
        delta = rnd(batch, seqlen, dim, scale=0.5).transpose(1, 2)
        z = rnd(batch, seqlen, dim).transpose(1, 2) if has_z else None
    else:
        u, delta = rnd(batch, dim, seqlen), rnd(batch, dim, seqlen, scale=0.5)
        z = rnd(batch, dim, seqlen) if has_z else None
    a = -(0.5 + torch.rand(dim, n_state, generator=gen, dtype=torch.float64)).to(
        torch.float32 if dtype != torch.float64 else dtype
    )
    b, c = rnd(batch, n_state, seqlen), rnd(batch, n_state, seqlen)
    if grouped:
        b, c = b.unsqueeze(1), c.unsqueeze(1)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    d = torch.randn(dim, generator=gen, dtype=torch.float64).to(wdtype) if has_d else None
    bias = (0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)).to(wdtype) if has_bias else None
    return [u, delta, a, b, c, d, z, bias]


def run(fn, inputs, grad_out=None, **kwargs):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    out, last = fn(*leaves, return_last_state=True, **kwargs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out, last, [None if x is None else x.grad for x in leaves], grad_out


def assert_match(inputs, rtol, atol, chunk_parallel=False, **kwargs):
    out_ref, last_ref, grads_ref, g = run(selective_scan_ref, inputs, **kwargs)
    out, last, grads, _ = run(selective_scan_torch, inputs, grad_out=g, chunk_parallel=chunk_parallel, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.to(last_ref.dtype), last_ref, rtol=rtol, atol=atol)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, g_ref, g_new in zip(names, grads_ref, grads):
        assert (g_ref is None) == (g_new is None), name
        if g_ref is not None:
            assert g_new.dtype == g_ref.dtype and g_new.shape == g_ref.shape, name
            torch.testing.assert_close(g_new, g_ref, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(
    ("has_d", "has_z", "has_bias"), [(True, True, True), (False, False, False), (True, False, True)]
)
def test_torch_scan_equals_sequential_loop_fp64(softplus, has_d, has_z, has_bias, chunk_parallel):
    inputs = make_inputs(has_d=has_d, has_z=has_z, has_bias=has_bias)
    assert_match(inputs, rtol=1e-10, atol=1e-10, chunk_parallel=chunk_parallel, delta_softplus=softplus)


@pytest.mark.parametrize("seqlen", [1, 2, 7, 64])
@pytest.mark.parametrize("block_elements", [1, 40, 10**6])
def test_torch_scan_exact_across_block_boundaries(monkeypatch, seqlen, block_elements):
    monkeypatch.setattr(scan_torch, "_BLOCK_ELEMENTS", block_elements)
    assert_match(make_inputs(seqlen=seqlen), rtol=1e-10, atol=1e-10, delta_softplus=True)


@pytest.mark.parametrize("seqlen", [1, 2, 7, 64])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunk_parallel_exact_for_every_chunk_and_length(monkeypatch, seqlen, chunk):
    """Chunks of odd and even length, a partial last chunk, one chunk longer than L, and L = 1."""
    monkeypatch.setattr(scan_torch, "_PARALLEL_CHUNK", chunk)
    assert_match(make_inputs(seqlen=seqlen), rtol=1e-10, atol=1e-10, chunk_parallel=True, delta_softplus=True)


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
def test_torch_scan_accepts_channel_last_and_grouped_bc(chunk_parallel):
    inputs = make_inputs(channel_last=True, grouped=True)
    assert_match(inputs, rtol=1e-10, atol=1e-10, chunk_parallel=chunk_parallel, delta_softplus=True)


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
def test_torch_scan_single_state_n1(monkeypatch, chunk_parallel):
    monkeypatch.setattr(scan_torch, "_PARALLEL_CHUNK", 8)
    inputs = make_inputs(n_state=1, seqlen=21, grouped=True)
    assert_match(inputs, rtol=1e-10, atol=1e-10, chunk_parallel=chunk_parallel, delta_softplus=True)


def extreme_inputs(dtype, softplus, seed=5):
    """Δ' from 1e-6 to 1e3 (raw Δ in [-30, 40] before softplus) and A from -1e-3 to -1e4: decays exp(Δ'A) from
    1 - 1e-9 down to exact zeros, state magnitudes up to ~1e3. A cumulative-product/cumsum scan that divides by
    exp(Σ Δ'A) would overflow here. Raw Δ above 20 also checks the softplus slope where F.softplus is the identity
    (the backward used σ(x) = 1 - 2e-9 there before, a 1e-9 relative error in dΔ; the fp64 case caught it)."""
    inputs = make_inputs(batch=2, dim=8, seqlen=45, n_state=4, dtype=dtype, has_bias=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = inputs[1].shape
    if softplus:  # softplus(-30) ~ 1e-13, softplus(40) = 40
        delta = -30 + 70 * torch.rand(shape, generator=gen, dtype=torch.float64)
    else:
        delta = 10 ** (-6 + 9 * torch.rand(shape, generator=gen, dtype=torch.float64))
    inputs[1] = delta.to(dtype)
    inputs[2] = -(10 ** (-3 + 7 * torch.rand(inputs[2].shape, generator=gen, dtype=torch.float64))).to(inputs[2].dtype)
    return inputs


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_scan_exact_at_extreme_delta_and_a(monkeypatch, softplus, chunk_parallel):
    monkeypatch.setattr(scan_torch, "_PARALLEL_CHUNK", 16)
    inputs = extreme_inputs(torch.float64, softplus)
    assert_match(inputs, rtol=1e-10, atol=1e-10, chunk_parallel=chunk_parallel, delta_softplus=softplus)
    inputs32 = extreme_inputs(torch.float32, softplus)
    assert_match(inputs32, rtol=RTOL, atol=ATOL, chunk_parallel=chunk_parallel, delta_softplus=softplus)


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
def test_torch_scan_fp32_within_mamba_ssm_tolerances(chunk_parallel):
    inputs = make_inputs(batch=2, dim=32, seqlen=256, n_state=16, dtype=torch.float32, channel_last=True)
    assert_match(inputs, rtol=RTOL, atol=ATOL, chunk_parallel=chunk_parallel, delta_softplus=True)


def test_chunk_parallel_python_loop_count_is_independent_of_batch(monkeypatch):
    """The chunk-parallel path runs ceil(L / T) block iterations per pass at any batch, each with ⌈log2 T⌉ + 1 levels
    of :func:`_linear_scan` per recurrence and no loop over steps. The batch-sized blocks of the CPU path (and of the
    torch backend on CUDA before this path existed) give 1 block at B=1 but 2 at B=32 here; at the model's training
    shape (B=32, D=1536, N=16) they were 1 step long: a Python loop over every step."""
    blocks, levels = [], []
    states, linear_scan = scan_torch._states, scan_torch._linear_scan

    def counting_states(*args):
        blocks.append(args[0].shape[0])  # steps in this block
        return states(*args)

    def counting_linear_scan(*args):
        levels.append(1)
        return linear_scan(*args)

    monkeypatch.setattr(scan_torch, "_states", counting_states)
    monkeypatch.setattr(scan_torch, "_linear_scan", counting_linear_scan)
    seqlen, dim, n_state = 100, 16, 16
    chunk = scan_torch._PARALLEL_CHUNK
    n_blocks = math.ceil(seqlen / chunk)
    block_lengths = [min(chunk, seqlen - i * chunk) for i in range(n_blocks)]
    for batch in (1, 32):
        blocks.clear(), levels.clear()
        inputs = make_inputs(batch=batch, dim=dim, seqlen=seqlen, n_state=n_state, dtype=torch.float32)
        run(selective_scan_torch, inputs, chunk_parallel=True, delta_softplus=True)
        assert blocks == block_lengths + block_lengths[::-1], batch  # forward, then backward's recompute in reverse
        # three recurrences per block (forward, backward's recompute, adjoint), bit_length(T) calls each
        assert len(levels) == 3 * sum(t.bit_length() for t in block_lengths), batch
    model_shape = {"n_state": 16, "dim": 1536, "seqlen": 1024}
    assert scan_torch._block_length(32, **model_shape, chunk_parallel=True) == chunk
    assert scan_torch._block_length(1, **model_shape, chunk_parallel=True) == chunk


def test_chunk_parallel_is_the_default_off_cpu_only():
    assert not scan_torch.default_chunk_parallel(torch.device("cpu"))
    assert scan_torch.default_chunk_parallel(torch.device("cuda", 0))


def test_chunk_parallel_custom_ops_pass_opcheck():
    """The op schema's ``chunk_parallel`` argument through fake, autograd and AOT dispatch (test_compile.py checks
    the default)."""
    u, delta, A, B, C, D, z, bias = make_inputs(batch=2, dim=4, seqlen=7, n_state=3, dtype=torch.float32)
    args = [x.requires_grad_() for x in (u, delta, A, B, C, D, z, bias)]
    fwd, bwd = torch.ops.zigma.selective_scan_torch_fwd.default, torch.ops.zigma.selective_scan_torch_bwd.default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # AOT dispatch: test_compile.py
    torch.library.opcheck(fwd, (*args, True, 3, True), test_utils=utils)
    detached = [x.detach() for x in args]
    out, _, states, y, *_ = fwd(*detached, True, 3, True)
    torch.library.opcheck(bwd, (torch.randn_like(out), *detached, states, y, True, 3, True), test_utils=utils)


@pytest.mark.parametrize(("has_d", "has_z", "has_bias"), [(True, True, True), (False, False, False)])
def test_kept_states_give_the_recompute_paths_outputs_and_gradients_bit_for_bit(monkeypatch, has_d, has_z, has_bias):
    """The CPU forward keeps every step's dA and h for backward up to ``_KEEP_STATES_ELEMENTS``; backward then reads
    them instead of re-running ``_states`` per block. Same ops in the same order, so nothing may differ by a bit
    (4 blocks of 5 steps and a partial one of 2)."""
    inputs = make_inputs(batch=2, dim=6, seqlen=22, n_state=4, dtype=torch.float32, has_d=has_d, has_z=has_z,
                         has_bias=has_bias, channel_last=True)  # fmt: skip
    monkeypatch.setattr(scan_torch, "_BLOCK_ELEMENTS", 5 * 2 * 4 * 6)
    states, calls = scan_torch._states, []
    monkeypatch.setattr(scan_torch, "_states", lambda *args: calls.append(args[0].shape[0]) or states(*args))
    results = {}
    for limit in (0, 2 * 22 * 4 * 6):  # recompute, then keep (the volume is exactly at the limit)
        monkeypatch.setattr(scan_torch, "_KEEP_STATES_ELEMENTS", limit)
        calls.clear()
        results[limit] = run(selective_scan_torch, inputs, grad_out=torch.ones(2, 6, 22), delta_softplus=True)
        assert calls == ([5, 5, 5, 5, 2] if limit else [5, 5, 5, 5, 2, 2, 5, 5, 5, 5]), limit
    (out_r, last_r, grads_r, _), (out_k, last_k, grads_k, _) = results.values()
    torch.testing.assert_close(out_k, out_r, rtol=0, atol=0)
    torch.testing.assert_close(last_k, last_r, rtol=0, atol=0)
    for name, g_r, g_k in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], grads_r, grads_k):
        assert (g_r is None) == (g_k is None), name
        if g_r is not None:
            torch.testing.assert_close(g_k, g_r, rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}")


def test_states_are_kept_on_the_cpu_path_for_a_backward_up_to_the_limit_only():
    limit = scan_torch._KEEP_STATES_ELEMENTS
    quickstart = {"batch": 32, "n_state": 8, "dim": 256, "seqlen": 64}  # 4 M elements
    assert scan_torch._keeps_states(**quickstart, chunk_parallel=False, needs_grad=True)
    assert not scan_torch._keeps_states(**quickstart, chunk_parallel=True, needs_grad=True)
    assert not scan_torch._keeps_states(**quickstart, chunk_parallel=False, needs_grad=False)
    assert scan_torch._keeps_states(limit, 1, 1, 1, chunk_parallel=False, needs_grad=True)
    assert not scan_torch._keeps_states(limit + 1, 1, 1, 1, chunk_parallel=False, needs_grad=True)
    inputs = make_inputs(batch=2, dim=4, seqlen=7, n_state=3, dtype=torch.float32)
    with torch.no_grad():  # inference keeps nothing: the op is called with keep_states=False
        out = selective_scan_torch(*inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_torch(*inputs, delta_softplus=True), rtol=0, atol=0)


def test_custom_ops_with_kept_states_pass_opcheck():
    """The ``keep_states`` flag, the two kept outputs and their use by backward through schema (which also checks
    that backward does not write into its inputs, the kept tensors among them), fake and autograd registrations."""
    u, delta, A, B, C, D, z, bias = make_inputs(batch=2, dim=4, seqlen=7, n_state=3, dtype=torch.float32)
    args = [x.requires_grad_() for x in (u, delta, A, B, C, D, z, bias)]
    fwd, bwd = torch.ops.zigma.selective_scan_torch_fwd.default, torch.ops.zigma.selective_scan_torch_bwd.default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # AOT dispatch: test_compile.py
    torch.library.opcheck(fwd, (*args, True, 3, False, True), test_utils=utils)
    detached = [x.detach() for x in args]
    out, _, states, y, decays, kept = fwd(*detached, True, 3, False, True)
    assert decays.shape == kept.shape == (7, 2, 3, 4)
    bwd_args = (torch.randn_like(out), *detached, states, y, True, 3, False, decays, kept)
    torch.library.opcheck(bwd, bwd_args, test_utils=utils)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_scan_on_cuda_is_chunk_parallel_and_matches_the_oracle(monkeypatch):
    blocks = []
    states = scan_torch._states
    monkeypatch.setattr(scan_torch, "_states", lambda *args: blocks.append(args[-1]) or states(*args))
    inputs = make_inputs(batch=4, dim=32, seqlen=200, n_state=16, dtype=torch.float32, channel_last=True)
    cuda_inputs = [x.cuda() for x in inputs]
    out_ref, last_ref, grads_ref, g = run(selective_scan_ref, inputs, delta_softplus=True)
    out, last, grads, _ = run(selective_scan_torch, cuda_inputs, grad_out=g.cuda(), delta_softplus=True)
    assert blocks == [True] * 2 * math.ceil(200 / scan_torch._PARALLEL_CHUNK)  # chunk_parallel, fwd and bwd
    torch.testing.assert_close(out.cpu(), out_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last.cpu(), last_ref, rtol=RTOL, atol=ATOL)
    for g_ref, g_new in zip(grads_ref, grads):
        torch.testing.assert_close(g_new.cpu(), g_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["loop", "parallel"])
def test_torch_scan_bf16_inputs_keep_dtypes(chunk_parallel):
    inputs = make_inputs(dim=8, seqlen=20, dtype=torch.bfloat16)
    out, last, grads, _ = run(selective_scan_torch, inputs, chunk_parallel=chunk_parallel, delta_softplus=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert [g.dtype for g in grads if g is not None] == [x.dtype for x in inputs if x is not None]
    ref = selective_scan_ref(*inputs, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=5e-2)


def test_last_state_is_not_differentiable():
    inputs = make_inputs()
    leaves = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    out, last = selective_scan_torch(*leaves, delta_softplus=True, return_last_state=True)
    assert out.requires_grad and not last.requires_grad


def test_dispatcher_picks_torch_on_cpu_and_rejects_bad_names():
    assert available_backends("cpu") == ["torch"]
    assert resolve_backend("auto", "cpu") == "torch"
    inputs = make_inputs(dtype=torch.float32)
    torch.testing.assert_close(
        selective_scan(*inputs, delta_softplus=True, backend="auto"), selective_scan_torch(*inputs, delta_softplus=True)
    )
    with pytest.raises(ValueError, match="not one of"):
        selective_scan(*inputs, backend="fast")
    with pytest.raises(ValueError, match="cannot run on device 'cpu'"):
        selective_scan(*inputs, backend="cuda")
