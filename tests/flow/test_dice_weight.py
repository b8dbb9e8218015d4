"""``flow_matching.dice_weight``: the soft Dice's share of the full-resolution Dice + CE term (issue #9)."""
import pytest
import torch

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.flow.loss import FlowMatchingLoss, cross_entropy_loss, soft_dice_loss
from medflowseg_nn.flow.path import LinearPath


@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 3)])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5, 1.0])
def test_seg_term_is_weighted_dice_plus_ce(spatial, dice_weight):
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 3, *spatial, generator=g)
    seg = torch.randint(0, 3, (2, *spatial), generator=g)
    x1 = 2 * torch.nn.functional.one_hot(seg, 3).movedim(-1, 1).float() - 1
    path = LinearPath().sample(torch.randn(x1.shape, generator=g), x1, torch.zeros(2))
    out = FlowMatchingLoss("x1", mse_weight=0.0, dice_weight=dice_weight)(raw, path, seg)
    expected = dice_weight * soft_dice_loss(raw, seg) + cross_entropy_loss(raw, seg)
    torch.testing.assert_close(out["seg"], expected)
    torch.testing.assert_close(out["loss"], expected)


def test_dice_weight_default_and_validation():
    assert FlowMatchingConfig().dice_weight == 1.0
    assert FlowMatchingConfig.from_dict({"dice_weight": 0.0}).dice_weight == 0.0
    with pytest.raises(ValueError, match="dice_weight"):
        FlowMatchingConfig(dice_weight=-0.5)
