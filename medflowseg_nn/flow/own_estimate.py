"""Training points on the sampler's own path: x_t between the prior and the network's one-step estimate.

With the ``x1`` parameterisation, the first Euler step of the sampler from ``(x0, t = 0)`` to ``t`` lands on

    x_t = x0 + t * (x̂1(x0) - x0) = (1 - t) * x0 + t * x̂1(x0),

the linear path to the network's OWN clean-mask estimate, not to the label. Plain flow-matching training only
shows the network ``x_t = (1 - t) x0 + t x1`` built from the ground truth, where the label is visible and can be
copied, so at sampling time the later steps see inputs unlike any they were trained on and tend to trust (and
sharpen) their own first estimate. Here a fraction of the samples drawn at ``t > 0`` is moved onto the sampler's
path (x̂1 computed without gradient, as in self-conditioning), while the targets — ``x1`` and the labels — stay
the ground truth: the network learns to correct its one-step estimate instead of copying. For N = 2 Euler steps
this is exactly the input of the second step; for more steps an approximation (later inputs mix several
estimates). Only meaningful for the ``x1`` parameterisation (:class:`~medflowseg_nn.config.FlowMatchingConfig`
refuses it for ``velocity``, whose target velocity ``x1 - x0`` would no longer match the moved x_t).

Independent of nnU-Net and of the network class: :func:`own_estimate_path` takes the estimate as a callable,
:func:`one_step_estimate` makes it from any field ``network(image, x_t, t)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from medflowseg_nn.flow.loss import interpret_output
from medflowseg_nn.flow.path import PathSample, expand_time

#: ``rows [M] (long) -> x̂1 [M, K, *S]``: the one-step clean-mask estimate of the batch rows ``rows`` from their
#: prior draw ``x0[rows]`` at t = 0
OneStepEstimate = Callable[[Tensor], Tensor]


def own_estimate_rows(t: Tensor, fraction: float, zero_width: float = 0.0,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices ``[M]`` of the samples whose x_t moves onto the sampler's path: each sample with ``t >
    zero_width`` (the t = 0 samples are the one-step task itself) independently with probability ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"own_estimate_fraction must be in [0, 1], got {fraction}")
    pick = torch.rand(t.shape[0], device=t.device, generator=generator) < fraction
    return torch.nonzero(pick & (t > zero_width)).flatten()


def label_free(t: Tensor, moved: Tensor, zero_width: float = 0.0) -> Tensor:
    """``[B]`` bool: the samples whose x_t does not show the label, so that a head on them has to segment from
    the image — those drawn at ``t <= zero_width`` (x_t is, or nearly is, the prior draw) and the rows ``moved``
    ``[M]`` (long) onto the sampler's own path."""
    free = t <= zero_width
    free[moved] = True
    return free


def own_estimate_path(path: PathSample, estimate: OneStepEstimate, fraction: float, zero_width: float = 0.0,
                      generator: Optional[torch.Generator] = None, rows: Optional[Tensor] = None) -> PathSample:
    """``path`` (a :class:`PathSample` of ``[B, K, *S]`` tensors) with ``x_t = (1 - t) x0 + t x̂1`` for the rows
    :func:`own_estimate_rows` picks (or the given ``rows [M]``, long), ``x̂1 = estimate(rows)`` taken without
    gradient; every other field (x0, x1, t, the target velocity) and every other row unchanged. ``fraction = 0``
    returns ``path`` itself and never calls ``estimate``."""
    if fraction == 0:
        return path
    if rows is None:
        rows = own_estimate_rows(path.t, fraction, zero_width, generator)
    if rows.numel() == 0:
        return path
    with torch.no_grad():
        x1_hat = estimate(rows).to(path.x_t.dtype)
    if x1_hat.shape != (rows.numel(), *path.x_t.shape[1:]):
        raise ValueError(f"the estimate of {rows.numel()} rows has shape {tuple(x1_hat.shape)}, expected "
                         f"{(rows.numel(), *path.x_t.shape[1:])}")
    tt = expand_time(path.t[rows], x1_hat)
    x_t = path.x_t.clone()
    x_t[rows] = (1 - tt) * path.x0[rows] + tt * x1_hat
    return dataclasses.replace(path, x_t=x_t)


def takes_prior_free(network: object) -> bool:
    """Whether ``network`` (unwrapped from DDP) may be called with ``x_t=None`` at t = 0 for the same output: it
    sees ``t · x_t`` (``time_scaled_x_t``) and accepts ``None`` (``VectorFieldUNet.accepts_prior_free``)."""
    return all(getattr(network, a, False) for a in ("accepts_prior_free", "time_scaled_x_t"))


def one_step_estimate(network: Callable[..., object], image: Tensor, x0: Tensor, parameterization: str,
                      logit_scale: float = 5.0, multilabel: bool = False, prior_free: bool = False) -> Tensor:
    """x̂1 ``[M, K, *S]`` of ``network`` at ``(x0 [M, K, *S], t = 0)`` given ``image [M, C, *S]``; of its first
    (full-resolution) output when it returns a deep-supervision list. ``prior_free``: the field sees ``t · x_t``
    and takes ``x_t=None`` at t = 0 (``VectorFieldUNet.accepts_prior_free``), so it is called without the prior
    and convolves the image alone — the same output (x̂1 of the ``x1`` output does not depend on x0), without the
    first convolution's x_t part."""
    t0 = torch.zeros(x0.shape[0], device=x0.device)
    raw = network(image, None if prior_free else x0, t0)
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    return interpret_output(raw, x0, t0, parameterization, logit_scale, multilabel=multilabel).x1_hat
