"""ODE sampling: seeded Gaussian prior, time grids and fixed-step Euler / Heun solvers.

The solver only sees a callable ``velocity(x, t) -> v`` with ``x: [B, K, *S]``, ``t: [B]`` and ``v`` of
``x``'s shape; it knows nothing about networks, images or labels. ``steps = 1`` with Euler is the one-step
deterministic inference of MedFlowSeg: ``x1 = x0 + v(x0, 0)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
SOLVERS = ("euler", "heun")
TIME_GRIDS = ("uniform", "quadratic")


def sample_prior(shape: Sequence[int], seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal ``x0`` of ``shape`` from a CPU generator seeded with ``seed``, so that the same seed
    gives the same noise on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def time_grid(steps: int, kind: str = "uniform", device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` increasing times from 0 to 1. ``quadratic`` (t_i = (i/N)^2) is denser near t = 0, where
    the field depends most on the image."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(0.0, 1.0, steps + 1, device=device)
    if kind == "uniform":
        return u
    if kind == "quadratic":
        return u ** 2
    raise ValueError(f"unknown time grid {kind!r}; use one of {TIME_GRIDS}")


@dataclass(frozen=True)
class SolverConfig:
    """How to integrate the flow from t = 0 to t = 1.

    Attributes:
        steps: number of intervals (1 = one network evaluation with Euler).
        method: ``euler`` (1 evaluation per step) or ``heun`` (2 per step, 2nd order).
        grid: ``uniform`` or ``quadratic`` time grid.
        euler_last_step: with Heun, skip the corrector on the final interval (needed when the field is
            singular at t = 1, as the clean-mask parameterisation v = (x̂1 - x) / (1 - t) is).
        path_mean: return the mean of the clean estimates ``x + (1 - t) v`` of every evaluation before t = 1
            (the point where the straight line through ``x`` with velocity ``v`` reaches t = 1) instead of the
            last state: a self-ensemble of the estimates along the path at no extra evaluation. With Euler the
            last estimate is the last state, so ``steps = 1`` is unchanged.
    """

    steps: int = 1
    method: str = "euler"
    grid: str = "uniform"
    euler_last_step: bool = False
    path_mean: bool = False

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver {self.method!r}; use one of {SOLVERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grid not in TIME_GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; use one of {TIME_GRIDS}")

    @property
    def num_evaluations(self) -> int:
        if self.method == "euler":
            return self.steps
        return 2 * self.steps - (1 if self.euler_last_step else 0)


def integrate(velocity: VelocityFn, x0: Tensor, config: SolverConfig = SolverConfig()) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (``x0``, ``[B, K, *S]``) to t = 1; returns ``[B, K, *S]``:
    the last state, or with ``config.path_mean`` the mean of the evaluations' clean estimates."""
    grid = time_grid(config.steps, config.grid, device=x0.device)
    x = x0
    batch = x0.shape[0]
    estimates = PathMean()
    for i in range(config.steps):
        t0, t1 = grid[i], grid[i + 1]
        dt = (t1 - t0).to(x.dtype)
        k1 = velocity(x, t0.expand(batch))
        if config.path_mean:
            estimates.add(x, t0, k1)
        if config.method == "euler" or (config.euler_last_step and i == config.steps - 1):
            x = x + dt * k1
        else:
            k2 = velocity(x + dt * k1, t1.expand(batch))
            if config.path_mean and bool(t1 < 1):  # at t = 1: only the predictor state (v may be singular)
                estimates.add(x + dt * k1, t1, k2)
            x = x + dt * 0.5 * (k1 + k2)
    return estimates.mean() if config.path_mean else x


class PathMean:
    """Running sum of the clean estimates ``x + (1 - t) v`` (``[B, K, *S]``) of a solver's evaluations."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor, t: Tensor, v: Tensor) -> None:
        """Add the estimate of the evaluation ``v`` at ``(x, t)``, ``t`` a scalar tensor."""
        estimate = x + (1 - t).to(x.dtype) * v
        self.total = estimate if self.total is None else self.total + estimate
        self.count += 1

    def mean(self) -> Tensor:
        if self.total is None:
            raise ValueError("no estimate was kept")
        return self.total / self.count
