"""The Triton selective scan (``zigma/ops/triton_scan.py``) against the reference: outputs, last state, every gradient.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set below before the kernels are
first imported (harmless for the rest of the session, since nothing else can run Triton on a CPU-only machine). With
CUDA the same tests run the compiled kernels on the GPU. Shapes are tiny: the interpreter executes every op in numpy.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the @triton.jit kernels

pytest.importorskip("triton", reason="the triton scan backend needs the triton package (requirements-gpu.txt)")

import triton
import triton.language as tl

from zigma.ops import triton_scan
from zigma.ops.guard import NAMES, TOLERANCES, gradient_tolerances
from zigma.ops.reference import selective_scan_ref

if triton_scan.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytestmark = pytest.mark.skip(
        reason="zigma.ops.triton_scan was imported before TRITON_INTERPRET=1 was set and there is no GPU; "
        "run this file on its own (pytest tests/zigma/ops/test_triton_scan.py) or with TRITON_INTERPRET=1"
    )
    DEVICE = "cpu"


def _vectorise_interpreter_scans() -> None:
    """Test-speed patch: let Triton's interpreter scan whole slices instead of single elements.

    ``triton.runtime.interpreter.ScanOps.generic_scan`` calls the combine function once per element; this version
    folds along the scan axis over whole slices, in the same order (``acc = combine(acc, x_i)``, reversed scans flipped
    by the caller as before), so results are unchanged. Skipped silently if Triton's internals differ.
    """
    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan") or not hasattr(scan_ops, "to_tensor"):
        return

    def generic_scan(self, inputs):
        data = [arg.handle.data for arg in inputs]
        outs = [np.empty_like(d) for d in data]
        acc = None
        for i in range(data[0].shape[self.axis]):
            index = (slice(None),) * self.axis + (i,)
            cur = tuple(self.to_tensor(d[index], arg.dtype) for d, arg in zip(data, inputs))
            if acc is None:
                acc = cur
            else:
                res = self.combine_fn.fn(*acc, *cur)
                acc = res if isinstance(res, tuple) else (res,)
            for out, a in zip(outs, acc):
                out[index] = a.handle.data
        return [self.to_tensor(out, arg.dtype) for out, arg in zip(outs, inputs)]

    scan_ops.generic_scan = generic_scan


if triton_scan.INTERPRET:
    _vectorise_interpreter_scans()

# mamba_ssm tests/ops/test_selective_scan.py: (rtol, atol) for outputs; weights use (1e-3, 1e-3), raised to the input
# tolerances when z is used. fp16/bf16 inputs are compared with the reference run on the same rounded inputs.
CASES = {
    # name: (dtype, batch, dim, seqlen, dstate, has_D, has_z, has_bias, softplus, chunk, l_split, layout)
    "all-fp32-L37": (torch.float32, 2, 24, 37, 8, True, True, True, True, 16, 2, "channel_last"),
    "bare-fp32-L17": (torch.float32, 2, 8, 17, 4, False, False, False, False, 8, 1, "contiguous"),
    "D-softplus-fp32-L1": (torch.float32, 2, 16, 1, 4, True, False, False, True, 8, 0, "channel_last"),
    "z-bias-N5-fp32-L33": (torch.float32, 2, 16, 33, 5, False, True, True, False, 8, 3, "bc_4d"),
    "D-bias-softplus-fp32-L70": (torch.float32, 2, 32, 70, 16, True, False, True, True, 16, 3, "channel_last"),
    "z-fp32-L64": (torch.float32, 1, 8, 64, 8, False, True, False, False, 16, 4, "contiguous"),
    "all-bf16-L37": (torch.bfloat16, 2, 16, 37, 8, True, True, True, True, 16, 2, "channel_last"),
    "all-fp16-L29": (torch.float16, 2, 16, 29, 4, True, True, True, True, 8, 2, "contiguous"),
    "all-N1-fp32-L11": (torch.float32, 1, 8, 11, 1, True, True, True, True, 4, 2, "bc_4d"),
}


def _make_inputs(dtype, batch, dim, seqlen, dstate, has_d, has_z, has_bias, layout, seed=0):
    """Inputs drawn as in mamba_ssm's test; ``layout`` picks how the (B, D, L) and (B, N, L) tensors sit in memory."""
    gen = torch.Generator().manual_seed(seed)

    def act(*shape, scale=1.0, rand=False):  # (B, D, L) or (B, N, L), in the requested memory layout
        b, c, length = shape
        x = torch.rand(b, length, c, generator=gen) if rand else torch.randn(b, length, c, generator=gen)
        x = (scale * x).to(dtype).transpose(1, 2)  # channel-last: the model's transposed (B, L, D) views
        return x.contiguous() if layout == "contiguous" else x

    u = act(batch, dim, seqlen)
    delta = act(batch, dim, seqlen, scale=0.5, rand=True)
    A = -0.5 * torch.rand(dim, dstate, generator=gen)
    B = act(batch, dstate, seqlen)
    C = act(batch, dstate, seqlen)
    if layout == "bc_4d":
        B, C = B.unsqueeze(1), C.unsqueeze(1)  # (B, 1, N, L): one group
    D = torch.randn(dim, generator=gen) if has_d else None
    z = act(batch, dim, seqlen) if has_z else None
    bias = 0.5 * torch.rand(dim, generator=gen) if has_bias else None
    return [x.to(DEVICE) if x is not None else None for x in (u, delta, A, B, C, D, z, bias)]


def _leaves(xs):
    return [x.detach().clone().requires_grad_() if x is not None else None for x in xs]


def _report(name, actual, expected):
    diff = (actual.float() - expected.float()).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


@pytest.mark.parametrize("case", list(CASES))
def test_triton_scan_matches_reference(case):
    dtype, batch, dim, seqlen, dstate, has_d, has_z, has_bias, softplus, chunk, l_split, layout = CASES[case]
    inputs = _make_inputs(dtype, batch, dim, seqlen, dstate, has_d, has_z, has_bias, layout)
    mine, ref = _leaves(inputs), _leaves(inputs)
    out, last = triton_scan.selective_scan_triton(*mine, softplus, True, chunk_size=chunk, l_split=l_split)
    out_ref, last_ref = selective_scan_ref(*ref, softplus, True)
    assert out.shape == (batch, dim, seqlen) and out.dtype == dtype
    assert last.shape == (batch, dim, dstate) and last.dtype == torch.float32 and not last.requires_grad
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    out.backward(grad)
    out_ref.backward(grad)

    rtol, atol = TOLERANCES[dtype]  # mamba_ssm's test tolerances, shared with the runtime guard
    _report("out", out, out_ref)
    _report("last_state", last, last_ref)
    for name, x, x_ref in zip(NAMES, mine, ref):
        if x is not None:
            _report(f"d{name}", x.grad, x_ref.grad)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    grad_tol = gradient_tolerances(dtype, has_z)  # input grads looser; half-input grads at the input tolerances
    for name, x, x_ref in zip(NAMES, mine, ref):
        if x is None:
            continue
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype, name
        r, a = grad_tol[name]
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=r, atol=a, msg=lambda m, name=name: f"d{name}: {m}")


def test_triton_scan_split_and_chunk_do_not_change_results():
    inputs = _make_inputs(torch.float32, 1, 16, 45, 4, True, True, True, "channel_last", seed=3)
    runs = [
        triton_scan.selective_scan_triton(*inputs, True, True, chunk_size=chunk, l_split=split)
        for chunk, split in ((8, 1), (8, 6), (16, 2), (64, 1))
    ]
    for out, last in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, runs[0][1], rtol=1e-5, atol=1e-5)


def _op_args(seed=0, with_options=True):
    """Channel-last arguments of torch.ops.zigma.selective_scan_fwd (everything the public wrapper passes)."""
    u, delta, A, B, C, D, z, bias = _make_inputs(
        torch.float32, 1, 8, 9, 4, with_options, with_options, with_options, "channel_last", seed=seed
    )
    tensors = [u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D]
    tensors += [z.transpose(1, 2) if z is not None else None, bias]
    return [x.detach().requires_grad_() if x is not None else None for x in tensors]


def test_triton_scan_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch, seqlen, dim, dstate, chunk = 3, 70, 24, 16, 16
    with FakeTensorMode():
        u = torch.empty(batch, seqlen, dim, dtype=torch.bfloat16)
        A = torch.empty(dim, dstate)
        B = torch.empty(batch, seqlen, dstate, dtype=torch.bfloat16)
        D = torch.empty(dim)
        cfg = triton_scan.TritonScanConfig(chunk_size=chunk).to_ints()
        out, last, states = torch.ops.zigma.selective_scan_fwd(u, u, A, B, B, D, u, D, True, cfg, True)
        _, _, no_states = torch.ops.zigma.selective_scan_fwd(u, u, A, B, B, D, u, D, True, cfg, False)
        grads = torch.ops.zigma.selective_scan_bwd(out, u, u, A, B, B, D, u, D, states, True, cfg)
        grads_bare = torch.ops.zigma.selective_scan_bwd(out, u, u, A, B, B, None, None, None, states, True, cfg)
    assert (out.shape, out.dtype) == ((batch, seqlen, dim), torch.bfloat16)
    assert (last.shape, last.dtype) == ((batch, dim, dstate), torch.float32)
    assert (states.shape, states.dtype) == ((batch, 5, dim, dstate), torch.float32)
    assert tuple(no_states.shape) == (batch, 0, dim, dstate)
    expected = [
        ((batch, seqlen, dim), torch.bfloat16),
        ((batch, seqlen, dim), torch.bfloat16),
        ((dim, dstate), torch.float32),
        ((batch, seqlen, dstate), torch.bfloat16),
        ((batch, seqlen, dstate), torch.bfloat16),
        ((dim,), torch.float32),
        ((batch, seqlen, dim), torch.bfloat16),
        ((dim,), torch.float32),
    ]
    assert [(tuple(g.shape), g.dtype) for g in grads] == expected
    assert [tuple(g.shape) for g in grads_bare][5:] == [(0,), (0,), (0,)]


@pytest.mark.parametrize("with_options", [True, False])
def test_triton_scan_opcheck(with_options):
    args = _op_args(with_options=with_options)
    chunk, split = (8, 0) if with_options else (4, 2)
    cfg = triton_scan.TritonScanConfig(chunk_size=chunk, l_split=split, deterministic=not with_options).to_ints()
    torch.library.opcheck(torch.ops.zigma.selective_scan_fwd.default, (*args, with_options, cfg, True))
    detached = [x.detach() if x is not None else None for x in args]
    out, _, states = torch.ops.zigma.selective_scan_fwd(*detached, with_options, cfg, True)
    torch.library.opcheck(
        torch.ops.zigma.selective_scan_bwd.default, (torch.randn_like(out), *detached, states, with_options, cfg)
    )


def test_triton_scan_compiles_without_graph_breaks():
    def loss(u, delta, A, B, C, D, z, bias):
        return (triton_scan.selective_scan_triton(u, delta, A, B, C, D, z, bias, True) ** 2).sum()

    inputs = _make_inputs(torch.float32, 1, 8, 9, 4, True, True, True, "channel_last", seed=5)
    eager, compiled = _leaves(inputs), _leaves(inputs)
    loss(*eager).backward()
    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled)
    value.backward()
    torch.testing.assert_close(value, loss(*inputs))
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x.grad, y.grad)


def test_triton_scan_rejects_bad_inputs():
    u, delta, A, B, C, *_ = _make_inputs(torch.float32, 1, 8, 5, 4, False, False, False, "channel_last")
    with pytest.raises(ValueError, match="chunk_size=12"):
        triton_scan.selective_scan_triton(u, delta, A, B, C, chunk_size=12)
    with pytest.raises(ValueError, match="grouped B"):
        triton_scan.selective_scan_triton(u, delta, A, torch.stack([B, B], 1), C)
    with pytest.raises(ValueError, match="C must be"):
        triton_scan.selective_scan_triton(u, delta, A, B, C[:, :, :4])
    with pytest.raises(ValueError, match=r"u\.dtype"):
        triton_scan.selective_scan_triton(u.double(), delta, A, B, C)


def test_triton_scan_config_is_validated_and_overridable():
    with pytest.raises(ValueError, match=r"^TritonScanConfig: bwd_block_d=12; must be a power of two >= 1$"):
        triton_scan.TritonScanConfig(bwd_block_d=12)
    with pytest.raises(ValueError, match=r"^TritonScanConfig: l_split=-1; must be an int >= 0$"):
        triton_scan.TritonScanConfig(l_split=-1)
    cfg = triton_scan.TritonScanConfig(chunk_size=8, deterministic=True)
    assert triton_scan.TritonScanConfig.from_ints(cfg.to_ints()) == cfg
    u, delta, A, B, C, *_ = _make_inputs(torch.float32, 1, 8, 5, 4, False, False, False, "channel_last")
    with pytest.raises(ValueError, match="config must be a TritonScanConfig"):
        triton_scan.selective_scan_triton(u, delta, A, B, C, config={"chunk_size": 8})


def test_num_splits_fill_the_gpu_from_occupancy():
    cfg = triton_scan.TritonScanConfig(fwd_block_d=16, fwd_programs_per_sm=24)  # the documented defaults
    assert cfg == dataclasses.replace(triton_scan.TritonScanConfig(), chunk_size=cfg.chunk_size)
    assert triton_scan._num_splits(32, 1536, 32, 132, cfg) == 1  # 3072 programs already fill 132 SMs x 24
    assert triton_scan._num_splits(4, 1536, 128, 132, cfg) == 8  # 384 programs: 24 x 132 // 384 = 8 splits
    assert triton_scan._num_splits(1, 64, 3, 132, cfg) == 3  # at most one split per chunk
    assert triton_scan._num_splits(4, 1536, 128, 132, dataclasses.replace(cfg, l_split=5)) == 5


@triton.jit
def _softplus_probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, triton_scan._softplus(x), mask=offs < n)


def test_softplus_matches_torch_within_1e6_relative():
    """Every fp32 x: the kernel's softplus against F.softplus (threshold 20) evaluated in fp64 and rounded to fp32.

    ``log(1 + exp(x))`` in fp32, the previous formula, is off by 4e-4 relative at x = -8 and 100 % below -17.
    """
    finfo = torch.finfo(torch.float32)
    special = [-1e4, -200.0, -100.0, -88.0, -87.0, -20.0, 19.999, 20.0, 20.001, 88.0, 1e4, finfo.min, finfo.max]
    special += [-float("inf"), float("inf"), 0.0, -0.0, finfo.tiny, -finfo.tiny]
    x = torch.cat([torch.linspace(-30, 30, 60_001), torch.tensor(special)]).to(DEVICE)
    y = torch.empty_like(x)
    _softplus_probe[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    expected = F.softplus(x.double()).float()  # exact softplus, correctly rounded to fp32
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=finfo.tiny)  # atol: results below the normal range
    assert torch.isnan(_softplus_of(torch.tensor([float("nan")], device=DEVICE))).all()


def _softplus_of(x):
    y = torch.empty_like(x)
    _softplus_probe[(1,)](x, y, x.numel(), BLOCK=16)
    return y


def test_triton_scan_stride0_upstream_gradient():
    """``out.sum().backward()`` hands the op an expanded (all strides 0) gradient; the kernels read it by stride."""
    inputs = _make_inputs(torch.float32, 2, 8, 13, 4, True, True, True, "channel_last", seed=7)
    mine, ref = _leaves(inputs), _leaves(inputs)
    cfg = triton_scan.TritonScanConfig(chunk_size=4, bwd_block_d=4)
    triton_scan.selective_scan_triton(*mine, True, config=cfg).sum().backward()
    selective_scan_ref(*ref, True).sum().backward()
    for name, x, x_ref in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], mine, ref):
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=3e-3, atol=5e-3, msg=lambda m, name=name: f"d{name}: {m}")


def _grads(inputs, config):
    leaves = _leaves(inputs)
    out = triton_scan.selective_scan_triton(*leaves, True, config=config)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    return [x.grad for x in leaves]


def test_deterministic_backward_is_bitwise_repeatable_and_matches_atomics():
    """Partial sums + sum (deterministic=True): identical bits on two runs, equal to the atomic path and the oracle."""
    inputs = _make_inputs(torch.float32, 2, 8, 12, 2, True, True, True, "channel_last", seed=11)
    det = triton_scan.TritonScanConfig(chunk_size=4, bwd_block_d=4, deterministic=True)
    first, second = _grads(inputs, det), _grads(inputs, det)
    atomic = _grads(inputs, dataclasses.replace(det, deterministic=False))
    ref = _leaves(inputs)
    out_ref = selective_scan_ref(*ref, True)
    out_ref.backward(torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    for name, a, b, c, r in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], first, second, atomic, ref):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
        torch.testing.assert_close(a, r.grad, rtol=3e-3, atol=5e-3, msg=lambda m, name=name: f"d{name}: {m}")


def test_chunk_states_are_written_only_when_a_gradient_can_flow(monkeypatch):
    calls = []
    launch = triton_scan.launch_forward

    def spy(*args, store_states, **kwargs):
        out = launch(*args, store_states=store_states, **kwargs)
        calls.append((store_states, tuple(out[2].shape)))
        return out

    monkeypatch.setattr(triton_scan, "launch_forward", spy)
    inputs = _make_inputs(torch.float32, 1, 8, 9, 4, True, True, True, "channel_last", seed=4)
    cfg = triton_scan.TritonScanConfig(chunk_size=4)
    plain = triton_scan.selective_scan_triton(*inputs, True, config=cfg)  # no input requires grad
    with torch.no_grad():
        sampled = triton_scan.selective_scan_triton(*_leaves(inputs), True, config=cfg)
    trained = triton_scan.selective_scan_triton(*_leaves(inputs), True, config=cfg)
    assert calls == [(False, (1, 0, 8, 4)), (False, (1, 0, 8, 4)), (True, (1, 3, 8, 4))]
    torch.testing.assert_close(plain, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sampled, trained.detach(), rtol=0, atol=0)


def test_backward_without_saved_states_fails_clearly():
    u, delta, A, B, C, *_ = _make_inputs(torch.float32, 1, 8, 9, 4, False, False, False, "channel_last")
    args = [u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), None, None, None]
    cfg = triton_scan.TritonScanConfig(chunk_size=4).to_ints()
    out, _, states = torch.ops.zigma.selective_scan_fwd(*args, False, cfg, False)
    with pytest.raises(ValueError, match="ran without storing states"):
        torch.ops.zigma.selective_scan_bwd(out, *args, states, False, cfg)
