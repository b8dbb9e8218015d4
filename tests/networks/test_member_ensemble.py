"""``MemberEnsembleField``: M independent narrow fields — training rows per member, each member's gradient as if
trained alone, eval mean probability, against the members called by hand (2D / 3D; plain and residual encoders)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.member_ensemble import (MemberEnsembleField, interleave, member_width_features,
                                                    scale_gradient)
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from tests.networks.test_mimo import C_IMG, K, inputs, small_field


def field(kind: str, dim: int, seed: int, deep_supervision: bool = False) -> nn.Module:
    return small_field(kind, dim, C_IMG, K, seed, deep_supervision, features=(4, 8, 16))


def ensemble(kind: str, dim: int, members: int, deep_supervision: bool = False) -> MemberEnsembleField:
    return MemberEnsembleField([field(kind, dim, seed, deep_supervision) for seed in range(members)])


def test_width_interleave_and_gradient_scale_by_hand():
    assert member_width_features([32, 64, 512], 0.5) == [16, 32, 256]
    assert member_width_features([3, 1], 0.3) == [1, 1]
    a, b = torch.zeros(2, 1), torch.ones(2, 1)
    assert interleave([a, b]).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]  # row r from member r mod 2
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_gradient(x, 3.0)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("members", [2, 3])
def test_training_row_r_goes_to_member_r_mod_m(dim, kind, members):
    net = ensemble(kind, dim, members).train()
    image, x_t = inputs(dim, 2 * members)
    t = torch.tensor([0.0, 0.6]).repeat_interleave(members)
    with torch.no_grad():
        out = net(image, x_t, t)
        for r in range(2 * members):
            alone = net.members[r % members](image[r:r + 1], x_t[r:r + 1], t[r:r + 1])
            assert torch.allclose(out[r:r + 1], alone, atol=1e-5)
    assert out.shape == x_t.shape
    with pytest.raises(ValueError, match=f"groups of {members} rows"):
        net(image[:-1], x_t[:-1], t[:-1])


@pytest.mark.parametrize("dim", [2, 3])
def test_each_member_gets_the_gradient_of_its_own_rows_mean_loss(dim):
    """The trainer's loss is a mean over all M·G rows; each member must be trained as if alone on its G rows."""
    members = 2
    net = ensemble("plain", dim, members).train()
    image, x_t = inputs(dim, 2 * members)
    t = torch.full((2 * members,), 0.3)
    net(image, x_t, t).square().mean().backward()
    together = [[p.grad.clone() for p in m.parameters()] for m in net.members]
    for i, member in enumerate(net.members):
        member.zero_grad()
        member(image[i::members], x_t[i::members], t[i::members]).square().mean().backward()
        for g, p in zip(together[i], member.parameters()):
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
def test_training_deep_supervision_outputs_are_interleaved_too(dim):
    net = ensemble("plain", dim, 2, deep_supervision=True).train()
    image, x_t = inputs(dim, 4)
    outs = net(image, None, torch.zeros(4))  # prior-free at t = 0
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0].shape == x_t.shape and outs[1].shape == (4, K, *[s // 2 for s in x_t.shape[2:]])
    with torch.no_grad():
        alone = net.members[1](image[1::2], None, torch.zeros(2))
    assert torch.allclose(outs[1][1::2], alone[1], atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_eval_returns_the_members_mean_probability(dim, kind):
    members = 3
    net = ensemble(kind, dim, members).eval()
    image, x_t = inputs(dim, 2)
    t = torch.tensor([0.0, 0.4])
    with torch.no_grad():
        out = net(image, x_t, t)
        probs = [torch.softmax(m(image, x_t, t), 1) for m in net.members]
        by_hand = sum(probs) / members
        assert out.shape == x_t.shape and torch.allclose(torch.softmax(out, 1), by_hand, atol=1e-5)
        assert not torch.allclose(by_hand, probs[0], atol=1e-3)  # independently initialised members differ
        t0 = torch.zeros(2)  # prior-free at t = 0 is any x_t's output; N samples of one image batch
        assert torch.allclose(net(image, None, t0), net(image, x_t, t0), atol=1e-5)
        two = net(image, torch.cat([x_t, x_t.flip(0)]), torch.cat([t, t]))
        assert torch.allclose(two[:2], out, atol=1e-5)


def test_refusals_and_attributes():
    with pytest.raises(ValueError, match="at least 2"):
        MemberEnsembleField([field("plain", 2, 0)])
    other = VectorFieldUNet(C_IMG, K + 1, 3, [4, 8, 16], nn.Conv2d, [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]],
                            [1, 1, 1], [1, 1], time_embed_dim=16)
    with pytest.raises(ValueError, match="channels differ"):
        MemberEnsembleField([field("plain", 2, 0), other])
    net = ensemble("plain", 2, 2, deep_supervision=True)
    assert net.input_channels == C_IMG and net.num_classes == K and net.time_scaled_x_t
    assert net.has_deep_supervision_heads
    net.set_deep_supervision(False)
    assert not any(m.deep_supervision for m in net.members)
    one = int(net.members[0].compute_conv_feature_map_size([16, 20]))
    assert int(net.compute_conv_feature_map_size([16, 20])) == 2 * one


@pytest.mark.parametrize("dim", [2, 3])
def test_member_temperatures_divide_each_members_logits_before_the_average(dim):
    net = ensemble("plain", dim, 2).eval()
    image, x_t = inputs(dim, 2)
    t = torch.tensor([0.0, 0.5])
    net.set_member_temperatures([2.0, 0.5])
    with torch.no_grad():
        out = net(image, x_t, t)
        by_hand = (torch.softmax(net.members[0](image, x_t, t) / 2.0, 1)
                   + torch.softmax(net.members[1](image, x_t, t) / 0.5, 1)) / 2
    assert torch.allclose(torch.softmax(out, 1), by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="positive member temperatures"):
        net.set_member_temperatures([1.0, 0.0])
    with pytest.raises(ValueError, match="2 positive"):
        net.set_member_temperatures([1.0])


def test_weights_saved_before_member_temperatures_load_with_every_member_at_one():
    net = ensemble("plain", 2, 2)
    net.set_member_temperatures([3.0, 2.0])
    state = {k: v for k, v in net.state_dict().items() if k != "member_temperature"}
    fresh = ensemble("plain", 2, 2)
    fresh.set_member_temperatures([5.0, 5.0])
    fresh.load_state_dict(state)  # strict: the missing buffer is filled in
    assert fresh.member_temperature.tolist() == [1.0, 1.0]
    fresh.load_state_dict(net.state_dict())
    assert fresh.member_temperature.tolist() == [3.0, 2.0]
