"""Linear (conditional optimal-transport) probability path and time samplers.

The path between a Gaussian prior sample ``x0`` and a data sample ``x1`` is

    x_t = (1 - t) * x0 + t * x1,        u_t = d x_t / d t = x1 - x0,

so the conditional target velocity does not depend on ``t``. Tensors are ``[B, K, *S]`` (batch, label
channels, 2 or 3 spatial axes); ``t`` is ``[B]`` and is broadcast over the remaining axes.

Time samplers return ``[B]`` tensors in ``[0, 1)``. Which sampler is used matters a great deal for one-step
inference, which evaluates the field only at ``t = 0``: see :class:`MixtureTimeSampler`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape ``t`` of shape ``[B]`` to ``[B, 1, ..., 1]`` so that it broadcasts against ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass(frozen=True)
class PathSample:
    """One draw from the path.

    Attributes:
        x0: prior sample, ``[B, K, *S]``.
        x1: data sample (label target in [-1, 1]), ``[B, K, *S]``.
        t: times, ``[B]``.
        x_t: point on the path, ``[B, K, *S]``.
        velocity: target velocity ``x1 - x0``, ``[B, K, *S]``.
    """

    x0: Tensor
    x1: Tensor
    t: Tensor
    x_t: Tensor
    velocity: Tensor


class LinearPath:
    """x_t = (1 - t) x0 + t x1 with target velocity x1 - x0."""

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        if x0.shape != x1.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must have the same shape")
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have shape [B]={x0.shape[0]}, got {tuple(t.shape)}")
        tt = expand_time(t, x0)
        x_t = (1 - tt) * x0 + tt * x1
        return PathSample(x0=x0, x1=x1, t=t, x_t=x_t, velocity=x1 - x0)


class TimeSampler:
    """Base class: ``sample(batch_size, device, generator) -> [B]`` times in [0, 1)."""

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class UniformTimeSampler(TimeSampler):
    """t ~ U(0, 1)."""

    def sample(self, batch_size, device="cpu", generator=None):
        return torch.rand(batch_size, device=device, generator=generator)


@dataclass(frozen=True)
class LogitNormalTimeSampler(TimeSampler):
    """t = sigmoid(m + s * n), n ~ N(0, 1) (Esser et al. 2024). A negative mean shifts mass towards t = 0."""

    mean: float = 0.0
    std: float = 1.0

    def sample(self, batch_size, device="cpu", generator=None):
        n = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(self.mean + self.std * n)


@dataclass(frozen=True)
class MixtureTimeSampler(TimeSampler):
    """With probability ``zero_fraction`` draw t from U(0, ``zero_width``) (``zero_width = 0``: exactly 0),
    otherwise from ``base``.

    One-step inference evaluates the field at t = 0, where only the image tells the label. Under t ~ U(0, 1)
    that regime is almost never trained (for t > 0 the label is already visible in x_t), so a fixed share of
    every batch is put at (or near) t = 0.
    """

    base: TimeSampler = UniformTimeSampler()
    zero_fraction: float = 0.5
    zero_width: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.zero_fraction <= 1.0:
            raise ValueError(f"zero_fraction must be in [0, 1], got {self.zero_fraction}")
        if not 0.0 <= self.zero_width < 1.0:
            raise ValueError(f"zero_width must be in [0, 1), got {self.zero_width}")

    def sample(self, batch_size, device="cpu", generator=None):
        t = self.base.sample(batch_size, device, generator)
        pick = torch.rand(batch_size, device=device, generator=generator) < self.zero_fraction
        near_zero = torch.rand(batch_size, device=device, generator=generator) * self.zero_width
        return torch.where(pick, near_zero, t)


@dataclass(frozen=True)
class GroupedTimeSampler(TimeSampler):
    """One t from ``base`` per group of ``group`` consecutive rows: ``[B]`` with rows ``g·group … (g+1)·group − 1``
    equal (the members of a MIMO group share one network row and its time embedding, ``networks.mimo``)."""

    base: TimeSampler = UniformTimeSampler()
    group: int = 2

    def sample(self, batch_size, device="cpu", generator=None):
        if batch_size % self.group:
            raise ValueError(f"batch of {batch_size} rows is not made of groups of {self.group}")
        return self.base.sample(batch_size // self.group, device, generator).repeat_interleave(self.group)


def build_time_sampler(name: str, zero_fraction: float = 0.0, zero_width: float = 0.0,
                       logit_mean: float = 0.0, logit_std: float = 1.0, group: int = 1) -> TimeSampler:
    """Build a sampler from plans-style settings. ``name`` is ``uniform`` or ``logit_normal``; a positive
    ``zero_fraction`` wraps it in a :class:`MixtureTimeSampler`, a ``group`` > 1 that in a
    :class:`GroupedTimeSampler`."""
    if name == "uniform":
        base: TimeSampler = UniformTimeSampler()
    elif name in ("logit_normal", "logitnormal"):
        base = LogitNormalTimeSampler(logit_mean, logit_std)
    else:
        raise ValueError(f"unknown time sampler {name!r}; use 'uniform' or 'logit_normal'")
    if zero_fraction > 0:
        base = MixtureTimeSampler(base, zero_fraction, zero_width)
    return GroupedTimeSampler(base, group) if group > 1 else base


def logit_normal_density(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Density of the logit-normal distribution (used by tests to check the sampler)."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
