"""ZigMa: shapes, upstream algebra and conventions, conditioning, checkpointing, bad arguments."""

import math

import pytest
import torch

from zigma import ZigMa
from zigma.layers import TimestepEmbedder, sincos_2d
from zigma.scan import ScanSpec

SMALL = {"in_channels": 3, "embed_dim": 32, "depth": 3, "img_dim": 8, "patch_size": 2, "drop_path_rate": 0.0}


def randomise_zero_inits(model):
    """adaLN and PE start at zero; give them values so tests exercise every path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or name == "pos_embed" or "null" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("scan_type", ["zigzagN8", "zigzagN1", "v2", "v1", "hilbertN8", "randomN4"])
def test_image_forward_shapes_and_gradients(scan_type):
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type=scan_type, use_pe=2))
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.rand(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("scan_type", ["zzvideo_sst", "video_st", "v2"])
def test_video_forward_keeps_batch_and_time_axes(scan_type):
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type=scan_type, use_pe=2, video_frames=3, num_classes=5))
    x = torch.randn(2, 3, 3, 8, 8)
    out = model(x, torch.rand(2), torch.tensor([1, 4]))
    assert out.shape == (2, 3, 3, 8, 8)
    # batch items stay apart: changing video 1 never changes the output for video 0
    x2 = x.clone()
    x2[1] += 1.0
    torch.testing.assert_close(model(x2, torch.rand(2) * 0 + 0.5, torch.tensor([1, 4]))[0],
                               model(x, torch.rand(2) * 0 + 0.5, torch.tensor([1, 4]))[0])  # fmt: skip


def test_quick_demo_from_upstream_readme_runs_on_cpu():
    """The README Quick Demo, changed only in the import and device (and `import torch`, which it omits)."""
    model = ZigMa(
        in_channels=3, embed_dim=640, depth=18, img_dim=32, patch_size=1, has_text=True, d_context=768,
        n_context_token=77, device="cpu", scan_type="zigzagN8", use_pe=2,
    )  # fmt: skip
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 117.00
    x = torch.rand(2, 3, 32, 32).to("cpu")  # the demo uses batch 10; 2 keeps the suite fast
    t = torch.rand(2).to("cpu")
    context = torch.rand(2, 77, 768).to("cpu")
    with torch.no_grad():
        out = model(x, t, y=context)
    assert out.shape == (2, 3, 32, 32)


def test_state_dict_keys_follow_upstream_checklist():
    keys = set(ZigMa(**SMALL, scan_type="zigzagN8", use_pe=2, has_text=True, d_context=16).state_dict())
    for key in [
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "pos_embed",
        "y_embedder.weight",
        "y_embedder.bias",
        "blocks.0.norm.weight",
        "blocks.0.adaLN_modulation.1.weight",
        "blocks.2.mixer.A_log",
        "blocks.1.msa.to_q.weight",
        "blocks.1.msa.to_out.0.bias",
        "norm_f.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
    ]:
        assert key in keys, key
    assert not any(k.startswith("final_layer.adaLN") or "norm_msa" in k for k in keys)
    assert ZigMa(**SMALL, scan_type="zigzagN8", use_pe=2, has_text=True, d_context=16)\
        .blocks[0].adaLN_modulation[1].out_features == 6 * 32  # fmt: skip
    no_pe = set(ZigMa(**SMALL, scan_type="zigzagN8", use_pe=0).state_dict())
    assert "pos_embed" not in no_pe


def test_adaln_zero_init_is_not_the_identity():
    """Upstream re-adds the normalised stream each block, so all-zero gates still change the input."""
    model = ZigMa(**SMALL, scan_type="zigzagN8").eval()
    assert all(torch.count_nonzero(b.adaLN_modulation[1].weight) == 0 for b in model.blocks)
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert out.abs().sum() > 0 and torch.isfinite(out).all()


def test_block_algebra_matches_handwritten_recurrence():
    """r_{i+1} = r_i + h_i, n = RMSNorm(r), h = n + g⊙Scan(Mamba)(n(1+s)+b); out = Final(RMSNorm_f(r + h))."""
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type="zigzagN2", use_pe=2)).double().eval()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(1000 * t)
    r = None
    for block in model.blocks:
        r = h if r is None else r + h
        n = rms(r, block.norm.weight)
        shift, scale, gate = block.adaLN_modulation(c).chunk(3, dim=1)
        mixed = block.mixer((n * (1 + scale[:, None]) + shift[:, None])[:, block.scan.path])[:, block.scan.inverse]
        h = n + gate[:, None] * mixed
    out = model.unpatchify(model.final_layer(rms(r + h, model.norm_f.weight)))
    torch.testing.assert_close(model(x, t), out)


def test_timestep_embedding_is_cos_then_sin():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 250.0]), 256)
    torch.testing.assert_close(emb[0, :128], torch.ones(128))
    torch.testing.assert_close(emb[0, 128:], torch.zeros(128))
    assert emb[1, 0] == pytest.approx(torch.cos(torch.tensor(250.0)).item(), abs=1e-5)


def test_fixed_sincos_pe_follows_mae_and_is_frozen():
    model = ZigMa(**SMALL, scan_type="zigzagN8", use_pe=1)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(sincos_2d(32, 4)).float())
    table = sincos_2d(32, 4)  # token 6 = (row 1, col 2): [sin(col·ω) | cos(col·ω) | sin(row·ω) | cos(row·ω)], ω0 = 1
    assert table[6, [0, 8, 16, 24]] == pytest.approx([math.sin(2), math.cos(2), math.sin(1), math.cos(1)])


def test_unpatchify_inverts_patchify():
    model = ZigMa(**{**SMALL, "patch_size": 2}, scan_type="zigzagN8")
    x = torch.randn(2, 3, 8, 8)
    p = 2
    tokens = x.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)  # (B, L, p·p·C) hwpqc
    torch.testing.assert_close(model.unpatchify(tokens), x)


def test_text_context_order_does_not_matter():
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type="zigzagN8", has_text=True, d_context=12)).eval()
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 5, 12)
    torch.testing.assert_close(model(x, t, ctx), model(x, t, ctx[:, torch.randperm(5)]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cond", ["class", "text"])
def test_null_condition_for_guidance(cond):
    kwargs = {"num_classes": 10} if cond == "class" else {"has_text": True, "d_context": 12}
    y = torch.tensor([3, 7]) if cond == "class" else torch.randn(2, 5, 12)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    upstream_like = ZigMa(**SMALL, scan_type="zigzagN8", **kwargs).eval()
    assert not upstream_like.has_null_condition
    with pytest.raises(ValueError, match="no learned null"):
        upstream_like(x, t, y, drop_cond=torch.tensor([False, True]))
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type="zigzagN8", cond_dropout_prob=0.1, **kwargs)).eval()
    assert model.has_null_condition
    out = model(x, t, y, drop_cond=torch.tensor([False, True]))
    torch.testing.assert_close(out[0], model(x, t, y)[0])
    other_y = torch.tensor([5, 1]) if cond == "class" else torch.randn(2, 5, 12)
    # a dropped row no longer depends on its condition
    torch.testing.assert_close(out[1], model(x, t, other_y, drop_cond=torch.tensor([False, True]))[1])


def test_condition_dropout_only_in_training():
    model = randomise_zero_inits(ZigMa(**SMALL, scan_type="zigzagN8", num_classes=10, cond_dropout_prob=0.5))
    x, t, y = torch.randn(64, 3, 8, 8), torch.full((64,), 0.5), torch.full((64,), 3)
    model.eval()
    ref = model(x[:1], t[:1], y[:1])
    outs = model(x, t, y)
    torch.testing.assert_close(outs[:1], ref)
    model.train()
    nulls = model(x[:1].expand(64, -1, -1, -1), t, y, drop_cond=torch.ones(64, dtype=torch.bool)).detach()
    mixed = model(x[:1].expand(64, -1, -1, -1), t, y).detach()
    dropped = (mixed - nulls).flatten(1).abs().amax(1) < 1e-6
    assert 10 < dropped.sum() < 54


def test_gradient_checkpointing_gives_identical_gradients():
    kwargs = {**SMALL, "scan_type": "zigzagN8", "use_pe": 2, "has_text": True, "d_context": 12}
    plain = randomise_zero_inits(ZigMa(**kwargs))
    ckpt = ZigMa(**kwargs, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 5, 12)
    for model in (plain, ckpt):
        model(x, t, ctx).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_drop_path_schedule_follows_upstream():
    model = ZigMa(**{**SMALL, "drop_path_rate": 0.1, "depth": 5}, scan_type="zigzagN8")
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.0, 0.025, 0.05, 0.075])
    assert model.drop_path.drop_prob == 0.1


def test_scan_spec_is_parsed_once_and_exposed():
    model = ZigMa(**SMALL, scan_type="zigzag4")
    assert model.scan_spec == ScanSpec.parse("zigzagN4")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_dim": 9, "patch_size": 2}, "patch_size=2 must divide img_dim=9"),
        ({"has_text": True}, "d_context"),
        ({"video_frames": 4, "scan_type": "zigzagN8"}, "image scan"),
        ({"video_frames": 4, "scan_type": "hilbertN2"}, "image scan"),
        ({"scan_type": "zzvideo_sst"}, "video scan"),
        ({"scan_type": "spiral8"}, "unknown scan_type"),
        ({"use_pe": 3}, "use_pe"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"depth": -1}, "depth"),
        ({"in_channels": 2.5}, "in_channels"),
        ({"has_text": True, "d_context": 8, "num_classes": 10}, "exclusive"),
        ({"tpe": True}, "tpe"),
        ({"cond_dropout_prob": 1.0}, "cond_dropout_prob"),
        ({"scan_type": "hilbertN8", "img_dim": 12, "patch_size": 2}, "power-of-two"),
        ({"use_pe": 1, "embed_dim": 30}, "divisible by 4"),
        ({"video_frames": -2, "scan_type": "v2"}, "video_frames"),
    ],
)
def test_bad_constructor_arguments_raise_one_clear_error(kwargs, message):
    base = {**SMALL, "scan_type": "zigzagN8"}
    with pytest.raises(ValueError, match=message):
        ZigMa(**{**base, **kwargs})


def test_bad_inputs_raise_clear_errors():
    model = ZigMa(**SMALL, scan_type="zigzagN8", num_classes=10)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) = \(B, 3, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class ids"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
