"""EMA math on a toy module."""

import pytest
import torch
from torch import nn

from zigma.ema import EMA


def toy():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    return net


def test_ema_follows_the_recurrence_and_copies_buffers():
    net = toy()
    ema = EMA(net, decay=0.9)
    for value in (2.0, 3.0):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        net[1].running_mean.fill_(value)
        ema.update(net)
    expected = 0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 3.0
    for p in ema.network.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected))
        assert not p.requires_grad
    torch.testing.assert_close(ema.network[1].running_mean, torch.full((4,), 3.0))
    assert int(ema.num_updates) == 2


def test_ema_warmup_decay_and_update_schedule():
    ema = EMA(toy(), decay=0.999, warmup=True, update_every=3, start_step=5)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.num_updates.fill_(100_000)  # (1 + k) / (10 + k) > 0.999
    assert ema.current_decay() == pytest.approx(0.999)
    assert [s for s in range(15) if ema.should_update(s)] == [5, 8, 11, 14]


def test_ema_copy_runs_in_eval_mode_whatever_mode_it_is_held_in_and_is_in_state_dict():
    ema = EMA(toy(), decay=0.5)
    ema.network[1].running_mean.fill_(2.0)
    ema.network[1].running_var.fill_(4.0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    expected = ema.network.eval()(x)  # BatchNorm with its running statistics, which must not move
    for mode in (True, False):
        ema.train(mode)
        assert all(m.training == mode for m in ema.network.modules())  # held like any submodule
        torch.testing.assert_close(ema(x), expected, rtol=0, atol=0)
        assert all(m.training == mode for m in ema.network.modules())  # restored after the call
    torch.testing.assert_close(ema.network[1].running_mean, torch.full((4,), 2.0))
    assert all(not p.requires_grad for p in ema.parameters())
    assert {"network.0.weight", "network.1.running_mean", "num_updates"} <= set(ema.state_dict())


def test_ema_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay"):
        EMA(toy(), decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        EMA(toy(), update_every=0)
