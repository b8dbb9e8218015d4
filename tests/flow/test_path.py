import pytest
import torch

from medflowseg_nn.flow.path import (LinearPath, LogitNormalTimeSampler, MixtureTimeSampler, UniformTimeSampler,
                                     build_time_sampler, logit_normal_density)

SHAPES = [(2, 3, 5, 6), (3, 2, 4, 5, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_path_endpoints_and_velocity_closed_form(shape):
    x0, x1 = torch.randn(shape), torch.randn(shape)
    path = LinearPath()
    s0 = path.sample(x0, x1, torch.zeros(shape[0]))
    s1 = path.sample(x0, x1, torch.ones(shape[0]))
    assert torch.allclose(s0.x_t, x0) and torch.allclose(s1.x_t, x1)
    t = torch.rand(shape[0])
    s = path.sample(x0, x1, t)
    tt = t.reshape(-1, *([1] * (len(shape) - 1)))
    assert torch.allclose(s.x_t, (1 - tt) * x0 + tt * x1)
    assert torch.allclose(s.velocity, x1 - x0)
    # the velocity is the time derivative of the path
    eps = 1e-3
    ds = (path.sample(x0, x1, t + eps).x_t - path.sample(x0, x1, t - eps).x_t) / (2 * eps)
    assert torch.allclose(ds, s.velocity, atol=1e-3)


def test_path_rejects_bad_shapes():
    with pytest.raises(ValueError):
        LinearPath().sample(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2))
    with pytest.raises(ValueError):
        LinearPath().sample(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3))


def test_uniform_and_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    u = UniformTimeSampler().sample(20000, generator=g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = LogitNormalTimeSampler(0.0, 1.0).sample(20000, generator=g)
    assert abs(ln.mean() - 0.5) < 0.01
    # histogram matches the analytic density
    hist = torch.histc(ln, bins=10, min=0, max=1) / len(ln) / 0.1
    centres = torch.arange(10) * 0.1 + 0.05
    assert torch.allclose(hist, logit_normal_density(centres), atol=0.08)
    shifted = LogitNormalTimeSampler(-1.0, 1.0).sample(20000, generator=g)
    assert shifted.mean() < 0.35


def test_mixture_puts_requested_share_at_zero():
    g = torch.Generator().manual_seed(0)
    t = MixtureTimeSampler(UniformTimeSampler(), zero_fraction=0.3).sample(20000, generator=g)
    assert abs((t == 0).float().mean() - 0.3) < 0.015
    t = MixtureTimeSampler(UniformTimeSampler(), zero_fraction=0.5, zero_width=0.05).sample(20000, generator=g)
    assert abs((t < 0.05).float().mean() - (0.5 + 0.5 * 0.05)) < 0.015


def test_build_time_sampler():
    assert isinstance(build_time_sampler("uniform"), UniformTimeSampler)
    assert isinstance(build_time_sampler("logit_normal", zero_fraction=0.5), MixtureTimeSampler)
    with pytest.raises(ValueError, match="unknown time sampler"):
        build_time_sampler("beta")
    with pytest.raises(ValueError):
        MixtureTimeSampler(zero_fraction=1.5)
