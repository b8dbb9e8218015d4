"""How the K samples of a patch are averaged: in probability space, returned as log-probabilities / log-odds.

No nnU-Net imports; used by :class:`~medflowseg_nn.inference.sampler.FlowSegmenter`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def average_log_probabilities(log_p: Tensor) -> Tensor:
    """``[K, B, C, *S]`` per-sample log-probabilities → ``[B, C, *S]`` log of their mean probability."""
    if log_p.shape[0] == 1:
        return log_p[0]
    return torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])


def average_region_logits(logits: Tensor) -> Tensor:
    """``[K, B, R, *S]`` per-sample region log-odds → ``[B, R, *S]`` log-odds of the mean probability,
    ``logit(mean_k sigmoid(l_k))``, computed in log space (stable for saturated logits)."""
    if logits.shape[0] == 1:
        return logits[0]
    log_k = math.log(logits.shape[0])
    log_p = torch.logsumexp(F.logsigmoid(logits), 0) - log_k
    log_q = torch.logsumexp(F.logsigmoid(-logits), 0) - log_k
    return log_p - log_q
