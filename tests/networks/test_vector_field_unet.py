import json
import pydoc
import subprocess
import sys

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.time_embedding import TimeEmbedding, sinusoidal_embedding
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet


def tiny_kwargs(dim: int) -> dict:
    n = 3
    return dict(n_stages=n, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
                kernel_sizes=[[3] * dim] * n, strides=[[1] * dim] + [[2] * dim] * (n - 1),
                n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
                norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                time_embed_dim=32)


ABLATIONS = {"full": {}, "noDBSA": {"dbsa_stages": []}, "noFAA": {"faa_stages": []},
             "neither": {"dbsa_stages": [], "faa_stages": []}}


@pytest.mark.parametrize("variant", list(ABLATIONS))
@pytest.mark.parametrize("spatial", [(16, 20), (12, 16, 12)])
def test_shapes_and_gradients(variant, spatial):
    net = VectorFieldUNet(2, 3, **tiny_kwargs(len(spatial)), **ABLATIONS[variant])
    image, x_t, t = torch.randn(2, 2, *spatial), torch.randn(2, 3, *spatial), torch.rand(2)
    out = net(image, x_t, t)
    assert out.shape == (2, 3, *spatial)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert (len(net.dbsa) > 0) == ("dbsa_stages" not in ABLATIONS[variant])
    assert (len(net.faa) > 0) == ("faa_stages" not in ABLATIONS[variant])


def test_output_depends_on_time_image_and_x_t():
    torch.manual_seed(0)
    net = VectorFieldUNet(1, 2, **tiny_kwargs(2)).eval()
    for p in net.parameters():  # make zero-initialised modulations active
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    image, x_t = torch.randn(1, 1, 16, 16), torch.randn(1, 2, 16, 16)
    base = net(image, x_t, torch.tensor([0.1]))
    assert not torch.allclose(base, net(image, x_t, torch.tensor([0.9])))
    assert not torch.allclose(base, net(torch.randn_like(image), x_t, torch.tensor([0.1])))
    assert not torch.allclose(base, net(image, torch.randn_like(x_t), torch.tensor([0.1])))


def test_channel_mismatch_is_a_clear_error():
    net = VectorFieldUNet(1, 2, **tiny_kwargs(2))
    with pytest.raises(ValueError, match="expected 1 image and 2 x_t channels"):
        net(torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), torch.zeros(1))


def test_bad_stage_indices():
    with pytest.raises(ValueError, match="dbsa_stages"):
        VectorFieldUNet(1, 2, **tiny_kwargs(2), dbsa_stages=[2])


def test_feature_map_size_grows_with_modules():
    sizes = {k: VectorFieldUNet(1, 3, **tiny_kwargs(3), **v).compute_conv_feature_map_size((16, 16, 16))
             for k, v in ABLATIONS.items()}
    assert sizes["neither"] < sizes["noDBSA"] < sizes["full"] and sizes["neither"] < sizes["noFAA"] < sizes["full"]


def test_time_embedding():
    e = sinusoidal_embedding(torch.tensor([0.0, 0.5]), 16)
    assert e.shape == (2, 16) and torch.allclose(e[0, :8], torch.ones(8))
    assert TimeEmbedding(32)(torch.rand(5)).shape == (5, 32)


def test_builds_from_hippocampus_like_plans_and_runs_backward():
    """Architecture keywords exactly as nnU-Net's planner writes them for Dataset004 3d_fullres."""
    arch = json.loads("""{"n_stages": 4, "features_per_stage": [32, 64, 128, 256],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3,3,3],[3,3,3],[3,3,3],[3,3,3]],
        "strides": [[1,1,1],[2,2,2],[2,2,2],[2,2,2]], "n_conv_per_stage": [2,2,2,2],
        "n_conv_per_stage_decoder": [2,2,2], "conv_bias": true,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": true},
        "dropout_op": null, "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}}""")
    for k in ("conv_op", "norm_op", "nonlin"):
        arch[k] = pydoc.locate(arch[k])
    for variant in ABLATIONS.values():
        net = VectorFieldUNet(1, 3, **arch, **variant)
        out = net(torch.randn(1, 1, 40, 56, 40), torch.randn(1, 3, 40, 56, 40), torch.rand(1))
        out.mean().backward()
        assert out.shape == (1, 3, 40, 56, 40)


def test_flow_and_networks_do_not_import_nnunetv2():
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "import medflowseg_nn.flow.path, medflowseg_nn.flow.solver, medflowseg_nn.flow.loss\n"
            "import medflowseg_nn.flow.label_space, medflowseg_nn.networks.vector_field_unet\n"
            "import medflowseg_nn.inference.sampler, medflowseg_nn.config\n"
            "assert not [m for m in sys.modules if m.startswith('nnunetv2.')]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def four_stage_kwargs(dim: int) -> dict:
    kw = tiny_kwargs(dim)
    n = 4
    kw.update(n_stages=n, features_per_stage=[8, 16, 32, 32], kernel_sizes=[[3] * dim] * n,
              strides=[[1] * dim] + [[2] * dim] * (n - 1), n_conv_per_stage=[1] * n,
              n_conv_per_stage_decoder=[1] * (n - 1))
    return kw


@pytest.mark.parametrize("spatial", [(16, 24), (16, 24, 16)], ids=["2d", "3d"])
def test_deep_supervision_outputs_highest_resolution_first(spatial):
    """Training mode: [B, K, *S], [B, K, *S/2], [B, K, *S/4] (a head per decoder stage, as nnU-Net's decoder)."""
    net = VectorFieldUNet(2, 3, **four_stage_kwargs(len(spatial)), deep_supervision=True)
    image, x_t, t = torch.randn(2, 2, *spatial), torch.randn(2, 3, *spatial), torch.rand(2)
    outs = net(image, x_t, t)
    assert isinstance(outs, list) and len(outs) == 3
    assert [o.shape for o in outs] == [(2, 3, *[s // f for s in spatial]) for f in (1, 2, 4)]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.aux_heads.parameters())
    # eval mode, or the switch off: the single full-resolution output, the same as the list's first entry
    net.eval()
    with torch.no_grad():
        single = net(image, x_t, t)
    assert isinstance(single, torch.Tensor) and torch.allclose(single, outs[0].detach(), atol=1e-6)
    net.train()
    net.set_deep_supervision(False)
    assert isinstance(net(image, x_t, t), torch.Tensor)


@pytest.mark.parametrize("dim", [2, 3])
def test_deep_supervision_off_is_the_plain_network(dim):
    """Without the option: no heads, a tensor in both modes, the same initial weights as before the option."""
    spatial = (16, 24) if dim == 2 else (16, 24, 16)
    torch.manual_seed(0)
    plain = VectorFieldUNet(1, 2, **four_stage_kwargs(dim))
    torch.manual_seed(0)
    with_heads = VectorFieldUNet(1, 2, **four_stage_kwargs(dim), deep_supervision=True)
    assert len(plain.aux_heads) == 0 and len(with_heads.aux_heads) == 2
    extra = set(with_heads.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("aux_heads.") for k in extra)
    image, x_t, t = torch.randn(1, 1, *spatial), torch.randn(1, 2, *spatial), torch.rand(1)
    assert isinstance(plain(image, x_t, t), torch.Tensor) and isinstance(plain.eval()(image, x_t, t), torch.Tensor)
    # the shared weights loaded into the DS network: its inference output is the plain network's
    with_heads.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(with_heads.eval()(image, x_t, t), plain(image, x_t, t))
    with pytest.raises(ValueError, match="without deep supervision heads"):
        plain.set_deep_supervision(True)


def test_deep_supervision_heads_count_in_the_feature_map_size():
    spatial = (16, 24, 16)
    plain = VectorFieldUNet(1, 3, **four_stage_kwargs(3)).compute_conv_feature_map_size(spatial)
    ds = VectorFieldUNet(1, 3, **four_stage_kwargs(3), deep_supervision=True).compute_conv_feature_map_size(spatial)
    assert ds - plain == 3 * (8 * 12 * 8 + 4 * 6 * 4)
