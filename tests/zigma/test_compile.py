"""torch.compile over a whole ZigMa on the torch scan backend: one graph, no breaks, eager's outputs and gradients.

The torch backend's Python time loops run inside the custom ops ``zigma::selective_scan_torch_fwd``/``_bwd``
(``zigma/ops/torch_scan.py``), which Dynamo keeps as opaque nodes. ``fullgraph=True`` turns any graph break into an
error, so every compiled call below also proves that the forward (and, through AOTAutograd, the backward) is one
graph. The backend is "aot_eager" (no C++ compiler): it runs the traced forward and backward graphs op by op.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from zigma import ZigMa
from zigma.ops.torch_scan import selective_scan_torch
from zigma.sampling import Sampler
from zigma.transport import create_transport

TINY = {"in_channels": 1, "img_dim": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
        "use_pe": 2, "drop_path_rate": 0.0, "scan_backend": "torch"}  # fmt: skip
# aot_eager runs the same kernels as eager, but AOTAutograd may order the backward's sums differently
TOL = {"rtol": 1e-5, "atol": 1e-6}
FWD_OP = torch.ops.zigma.selective_scan_torch_fwd.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cache hits, no recompile limit carried over from other tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(**overrides) -> ZigMa:
    torch.manual_seed(0)
    model = ZigMa(**{**TINY, **overrides})
    # The DiT init zeroes adaLN, hence every block's gate: redraw it so that gradients reach the mixers and the scan.
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.2)
            block.adaLN_modulation[-1].bias.normal_(std=0.2)
    return model


def batch(size: int = 3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size, 1, 8, 8, generator=gen)  # (B, C, H, W)
    t = torch.rand(size, generator=gen)  # (B,) in [0, 1]
    grad = torch.randn(size, 1, 8, 8, generator=gen)  # one shared upstream gradient
    return x, t, grad


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_compile_training_forward_backward_matches_eager_in_one_graph(use_checkpoint):
    eager = tiny_model(use_checkpoint=use_checkpoint)
    net = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, fullgraph=True, backend=counter)
    x, t, grad = batch()

    out_eager = eager(x, t)
    out_eager.backward(grad)
    out = compiled(x, t)
    out.backward(grad)

    assert counter.frame_count == 1  # one Dynamo graph for the whole forward
    torch.testing.assert_close(out, out_eager, **TOL)
    for (name, p_eager), p in zip(eager.named_parameters(), net.parameters()):
        if p_eager.grad is None:  # parameters the forward never uses (none expected here)
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, p_eager.grad, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    scan_grads = [net.blocks[i].mixer.A_log.grad for i in range(len(net.blocks))]
    assert all(g is not None and g.abs().sum() > 0 for g in scan_grads)  # the scan's backward really ran


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_compile_explain_finds_one_graph_and_no_break(use_checkpoint):
    model = tiny_model(use_checkpoint=use_checkpoint)
    x, t, _ = batch()
    explanation = torch._dynamo.explain(model)(x, t)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    if not use_checkpoint:  # with checkpointing the blocks sit inside a checkpoint sub-graph
        scans = [op for op in explanation.ops_per_graph[0] if op is FWD_OP]
        assert len(scans) == len(model.blocks)  # the scan is one opaque node per (unidirectional) block


def test_compile_sampling_under_no_grad_matches_eager():
    model = tiny_model().eval()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    sample = Sampler(create_transport()).sample_ode(method="euler", num_steps=4)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = sample(x0, model).x
        result = sample(x0, compiled)
    assert result.nfe == 3
    torch.testing.assert_close(result.x, expected, **TOL)


def test_module_compile_in_place_keeps_state_dict_keys_unprefixed():
    model = tiny_model()
    keys = list(model.state_dict())
    wrapped = torch.compile(copy.deepcopy(model), backend="aot_eager")
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())  # the control: why we compile in place

    counter = CompileCounterWithBackend("aot_eager")
    model.compile(fullgraph=True, backend=counter)
    x, t, grad = batch()
    model(x, t).backward(grad)
    assert counter.frame_count == 1  # the module's own __call__ now runs the compiled forward
    assert list(model.state_dict()) == keys
    model.load_state_dict(tiny_model().state_dict())  # an eager checkpoint loads into the compiled module as is


def test_torch_scan_alone_compiles_without_graph_breaks():
    """The op by itself (no dispatcher, no model): compiled value and input gradients equal eager's."""

    def loss(u, delta, A, B, C, D, z, bias):
        out, last = selective_scan_torch(u, delta, A, B, C, D, z, bias, True, True)
        return (out**2).sum() + last.sum()

    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 6, 9, generator=gen), 0.5 * torch.randn(2, 6, 9, generator=gen),
              -0.5 - torch.rand(6, 4, generator=gen), torch.randn(2, 1, 4, 9, generator=gen),
              torch.randn(2, 4, 9, generator=gen), torch.randn(6, generator=gen),
              torch.randn(2, 6, 9, generator=gen), torch.randn(6, generator=gen)]  # fmt: skip
    eager = [x.clone().requires_grad_() for x in inputs]
    compiled = [x.clone().requires_grad_() for x in inputs]
    expected = loss(*eager)
    expected.backward()
    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled)
    value.backward()
    torch.testing.assert_close(value, expected, **TOL)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x.grad, y.grad, **TOL)


@pytest.mark.parametrize("options", [True, False], ids=["D-z-bias-softplus", "bare"])
def test_torch_scan_custom_ops_pass_opcheck(options):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    gen = torch.Generator().manual_seed(3)
    batch_size, dim, seqlen, n_state = 2, 4, 7, 3
    u, delta, z = (torch.randn(batch_size, dim, seqlen, generator=gen) for _ in range(3))
    A = -torch.rand(dim, n_state, generator=gen) - 0.5
    B, C = (torch.randn(batch_size, n_state, seqlen, generator=gen) for _ in range(2))
    D, bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    if not options:
        D = z = bias = None
    args = [x.requires_grad_() if x is not None else None for x in (u, delta, A, B, C, D, z, bias)]
    block = 3  # three blocks, the last one partial
    torch.library.opcheck(FWD_OP, (*args, options, block))

    detached = [x.detach() if x is not None else None for x in args]
    out, _, states, y, *_ = FWD_OP(*detached, options, block)
    bwd = torch.ops.zigma.selective_scan_torch_bwd.default
    torch.library.opcheck(bwd, (torch.randn_like(out), *detached, states, y, options, block))
    # and the public wrapper is differentiable through the op
    selective_scan_torch(*args, delta_softplus=options).sum().backward()
    assert all(x.grad is not None for x in args if x is not None)
