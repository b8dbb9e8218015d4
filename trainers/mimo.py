"""The training side of a MIMO vector field (:mod:`medflowseg_nn.networks.mimo`): each member's rows of a batch.

Havasi et al. (ICLR 2021) give each of the M subnetworks its own, independently shuffled examples, so that the
members learn independent functions of the input: here every loaded row appears once per member — member 0 in the
loader's order, members 1 … M−1 in a fresh random order each — and group g (M consecutive network rows) holds
``(row g, perm_1[g], …, perm_{M−1}[g])``. Every member sees the whole batch each step (the loss, a mean over the
G·M rows, weighs each member equally), and one network row carries a group, so a step costs about what the
one-network step costs. The trainer draws one t per group (``flow.path.GroupedTimeSampler``). Input repetition
(``flow_matching.mimo_input_repetition`` ρ): each group independently, with probability ρ, gives every member
member 0's row — the members' tasks overlap, so each is trained more on a short budget, at the cost of diversity.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from medflowseg_nn.errors import UserError

Target = Union[torch.Tensor, list[torch.Tensor]]


def member_rows(batch: int, members: int, generator: Optional[torch.Generator] = None, repetition: float = 0.0,
                device: Union[torch.device, str] = "cpu") -> torch.Tensor:
    """``[batch · members]`` long: loader rows in groups of ``members`` (module docstring); member 0 is the
    identity, each other member a random permutation of ``0 … batch − 1``, except in the groups drawn (each with
    probability ``repetition``) to repeat member 0's row for every member."""
    identity = torch.arange(batch, device=device)
    repeat = torch.rand(batch, generator=generator, device=device) < repetition
    orders = [identity] + [torch.where(repeat, identity, torch.randperm(batch, generator=generator, device=device))
                           for _ in range(members - 1)]
    return torch.stack(orders, 1).flatten()


def mimo_batch(image: torch.Tensor, target: Target, members: int, repetition: float = 0.0,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Target]:
    """``image`` ``[B, C, *S]`` and ``target`` (a tensor or nnU-Net's deep-supervision list, ``[B, …]`` each) as
    ``[B · members, …]`` in MIMO groups (:func:`member_rows`, with ``repetition``); unchanged for ``members`` 1."""
    if members == 1:
        return image, target
    rows = member_rows(image.shape[0], members, generator, repetition)
    pick = (lambda x: x[rows.to(x.device)])
    return pick(image), [pick(s) for s in target] if isinstance(target, (list, tuple)) else pick(target)


def check_mimo_label_space(members: int, has_regions: bool) -> None:
    """Refuse MIMO or ensemble members for region labels: the members' outputs are averaged as softmax
    probabilities."""
    if members > 1 and has_regions:
        raise UserError("flow_matching.network mimo_members / ensemble_members > 1 average the members' softmax "
                        "probabilities; region labels (sigmoid per channel) are not supported, set both to 1")
