"""Training with 70 % of the labels erased (the ignore label) still segments.

A tiny conv field on an easy 2D task (bright discs on a dark background, noise): trained with
:class:`FlowMatchingLoss` and the ignore mask it segments fully labelled test images well; trained on the same
erased labels *without* the mask (erased voxels taken as background) it does not — so the mask is what works.
"""
from __future__ import annotations

import torch
from torch import nn

from medflowseg_nn.flow.label_space import encode_labels, prior_where_ignored
from medflowseg_nn.flow.loss import FlowMatchingLoss, interpret_output
from medflowseg_nn.flow.path import LinearPath, MixtureTimeSampler

IGNORE = 2


class TinyField(nn.Module):
    """``(image [B, 1, H, W], x_t [B, 2, H, W], t [B]) -> [B, 2, H, W]``; t enters as a constant channel."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, image, x_t, t):
        return self.net(torch.cat([image, x_t, t[:, None, None, None].expand_as(image)], 1))


def discs(n: int, g: torch.Generator, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 1, size, size]`` and labels ``[n, 1, size, size]`` (1 inside a random disc)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
    radius = torch.rand(n, generator=g) * size * 0.15 + size * 0.15
    inside = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) <= radius[:, None,
                                                                                                       None] ** 2
    label = inside[:, None].long()
    image = label.float() * 2 - 1 + 0.5 * torch.randn(label.shape, generator=g)
    return image, label


def train(use_mask: bool, steps: int = 120, seed: int = 0) -> TinyField:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    field, loss_fn, path = TinyField(), FlowMatchingLoss("x1"), LinearPath()
    sampler = MixtureTimeSampler(zero_fraction=0.5)
    optimizer = torch.optim.Adam(field.parameters(), lr=3e-3)
    for _ in range(steps):
        image, label = discs(8, g)
        erased = torch.where(torch.rand(label.shape, generator=g) < 0.7, torch.full_like(label, IGNORE), label)
        encoded = encode_labels(erased, 2, ignore_label=IGNORE) if use_mask else encode_labels(
            torch.where(erased == IGNORE, torch.zeros_like(erased), erased), 2)
        x0 = torch.randn_like(encoded.x1)
        t = sampler.sample(8, generator=g)
        sample = path.sample(x0, prior_where_ignored(encoded.x1, x0, encoded.mask), t)
        loss = loss_fn(field(image, sample.x_t, t), sample, encoded.labels, encoded.mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return field


@torch.no_grad()
def one_step_dice(field: TinyField, seed: int = 99) -> float:
    image, label = discs(16, torch.Generator().manual_seed(seed))
    x0 = torch.randn(16, 2, *label.shape[2:], generator=torch.Generator().manual_seed(seed + 1))
    t = torch.zeros(16)
    predicted = interpret_output(field(image, x0, t), x0, t, "x1").logits.argmax(1)
    truth = label[:, 0]
    tp = ((predicted == 1) & (truth == 1)).sum().item()
    return 2 * tp / max((predicted == 1).sum().item() + (truth == 1).sum().item(), 1)


def test_training_with_70_percent_ignored_still_segments():
    image, label = discs(16, torch.Generator().manual_seed(99))
    chance = 2 * label.float().mean().item() / (1 + label.float().mean().item())  # Dice of "all foreground"
    with_mask = one_step_dice(train(use_mask=True))
    without_mask = one_step_dice(train(use_mask=False))
    assert with_mask > 0.85 and with_mask > chance + 0.3, (with_mask, chance)
    assert with_mask > without_mask + 0.1, (with_mask, without_mask)
