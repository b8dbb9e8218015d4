"""Time embedding and FiLM modulation (medflowseg_nn.networks.time_embedding), closed form, 2D and 3D."""
from __future__ import annotations

import pytest
import torch

from medflowseg_nn.networks.time_embedding import TimeEmbedding, TimeModulation, sinusoidal_embedding


def test_sinusoidal_embedding_closed_form():
    emb = sinusoidal_embedding(torch.tensor([0.0, 0.5]), 4)
    assert torch.allclose(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    args = 1000.0 * 0.5 * torch.tensor([1.0, 0.01])  # freqs exp(-ln(1e4) i / 2), i = 0, 1
    assert torch.allclose(emb[1], torch.cat([torch.cos(args), torch.sin(args)]), atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.zeros(1), 3)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
def test_modulation_is_identity_at_init_and_film_after(spatial):
    torch.manual_seed(0)
    mod, temb = TimeModulation(8, 3), TimeEmbedding(8)(torch.tensor([0.0, 0.7]))
    x = torch.randn(2, 3, *spatial, requires_grad=True)
    assert torch.equal(mod(x, temb), x)
    torch.nn.init.normal_(mod.proj[1].weight)
    torch.nn.init.normal_(mod.proj[1].bias)
    scale, shift = mod.proj(temb).chunk(2, dim=1)
    shape = (2, 3) + (1,) * len(spatial)
    expected = x * (1 + scale.reshape(shape)) + shift.reshape(shape)
    out = mod(x, temb)
    assert torch.allclose(out, expected, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, mod.proj[1].weight], g)
    ref = torch.autograd.grad(expected, [x, mod.proj[1].weight], g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref))


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
def test_inplace_modulation_equals_the_new_tensor_one_and_refuses_autograd(spatial):
    torch.manual_seed(0)
    mod, temb = TimeModulation(8, 3), TimeEmbedding(8)(torch.tensor([0.0, 0.7])).detach()
    torch.nn.init.normal_(mod.proj[1].weight)
    x = torch.randn(2, 3, *spatial)
    with torch.inference_mode():
        expected = mod(x, temb)
        y = x.clone()
        out = mod(y, temb, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="inference only"):
        mod(x.clone(), temb, inplace=True)
