import math

import pytest
import torch

from medflowseg_nn.flow.solver import SolverConfig, integrate, sample_prior, time_grid


def test_prior_is_seeded_and_standard_normal():
    a, b = sample_prior((4, 3, 16, 16), seed=7), sample_prior((4, 3, 16, 16), seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_prior((4, 3, 16, 16), seed=8))
    big = sample_prior((200000,), seed=1)
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_time_grid():
    assert torch.allclose(time_grid(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    q = time_grid(4, "quadratic")
    assert q[0] == 0 and q[-1] == 1 and torch.all(q[1:] > q[:-1]) and q[1] < 0.25
    with pytest.raises(ValueError):
        time_grid(0)


def test_one_step_euler_is_x0_plus_v_at_zero():
    x0 = torch.randn(2, 3, 4, 4)
    target = torch.randn(2, 3, 4, 4)
    # the conditional OT field towards a fixed target is constant along the path: exact in one step
    out = integrate(lambda x, t: (target - x) / (1 - t.reshape(-1, 1, 1, 1)), x0, SolverConfig(steps=1))
    assert torch.allclose(out, target, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_linear_field_is_integrated_exactly(method):
    # v = c (constant) -> x1 = x0 + c exactly for any number of steps
    x0, c = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    for steps in (1, 3, 8):
        assert torch.allclose(integrate(lambda x, t: c, x0, SolverConfig(steps, method)), x0 + c, atol=1e-5)


def _error(method: str, steps: int) -> float:
    # dx/dt = x * cos(t): x(1) = x0 * exp(sin(1))
    x0 = torch.ones(1, 1, 1, dtype=torch.float64)
    field = lambda x, t: x * torch.cos(t.to(x.dtype)).reshape(-1, 1, 1)  # noqa: E731
    out = integrate(field, x0, SolverConfig(steps=steps, method=method))
    return abs(out.item() - math.exp(math.sin(1.0)))


def test_orders_of_accuracy():
    euler = [_error("euler", n) for n in (8, 16, 32)]
    heun = [_error("heun", n) for n in (8, 16, 32)]
    for a, b in zip(euler, euler[1:]):
        assert 1.8 < a / b < 2.2  # first order
    for a, b in zip(heun, heun[1:]):
        assert 3.6 < a / b < 4.4  # second order


def test_heun_euler_last_step_counts_evaluations():
    calls = []
    x0 = torch.zeros(1, 1, 2)
    integrate(lambda x, t: calls.append(t) or torch.ones_like(x), x0, SolverConfig(4, "heun", euler_last_step=True))
    assert len(calls) == SolverConfig(4, "heun", euler_last_step=True).num_evaluations == 7
    assert all(float(t.max()) < 1 for t in calls)


def test_solver_config_validation():
    with pytest.raises(ValueError):
        SolverConfig(method="rk4")
    with pytest.raises(ValueError):
        SolverConfig(steps=0)


def _moving_estimate(c: torch.Tensor):
    """A clean-mask field whose estimate at time t is ``c * (1 + t)``: v = (c (1 + t) - x) / (1 - t)."""
    return lambda x, t: (c * (1 + t.reshape(-1, 1, 1)) - x) / (1 - t.reshape(-1, 1, 1))


@pytest.mark.parametrize("config, factor", [
    (SolverConfig(1, path_mean=True), 1.0),  # one step: the only estimate, as without path_mean
    (SolverConfig(2, path_mean=True), (1 + 1.5) / 2),  # estimates at t = 0, 0.5
    (SolverConfig(4, path_mean=True), (1 + 1.25 + 1.5 + 1.75) / 4),
    (SolverConfig(2, grid="quadratic", path_mean=True), (1 + 1.25) / 2),  # t = 0, 0.25
    # Heun's evaluations: t = 0, its corrector at 0.5, then the last interval's Euler step at 0.5
    (SolverConfig(2, "heun", euler_last_step=True, path_mean=True), (1 + 1.5 + 1.5) / 3),
])
def test_path_mean_is_the_mean_of_the_clean_estimates(config, factor):
    x0, c = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    out = integrate(_moving_estimate(c), x0, config)
    assert torch.allclose(out, factor * c, atol=1e-9)
    last = integrate(_moving_estimate(c), x0, SolverConfig(config.steps, config.method, config.grid,
                                                              config.euler_last_step))
    assert torch.allclose(last, c * (1 + float(time_grid(config.steps, config.grid)[-2])), atol=1e-9)


@pytest.mark.parametrize("steps", [1, 3])
def test_path_mean_of_a_fixed_target_is_the_target(steps):
    x0, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    field = lambda x, t: (target - x) / (1 - t.reshape(-1, 1, 1))  # noqa: E731
    assert torch.allclose(integrate(field, x0, SolverConfig(steps, path_mean=True)), target, atol=1e-5)
