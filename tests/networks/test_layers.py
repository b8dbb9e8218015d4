"""``conv_with``: a conv module's convolution with another weight; oneDNN for batch-1 3D inference convolutions
(``prefers_onednn``, ``InferenceConv3d``, ``use_onednn_convs``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medflowseg_nn.networks.layers import InferenceConv3d, conv_with, prefers_onednn, use_onednn_convs
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_conv_with_equals_the_functional_convolution(channels, stride, dilation):
    conv = nn.Conv3d(channels, 6, 3, stride, padding=dilation, dilation=dilation, bias=True)
    x = torch.randn(1, channels, 9, 12, 10)
    expected = F.conv3d(x, conv.weight, conv.bias, stride, dilation, dilation)
    with torch.inference_mode():
        assert prefers_onednn(x, conv.weight, 1) == torch.backends.mkldnn.is_available()
        got = conv_with(conv, x, conv.weight, conv.bias)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.inference_mode():  # another weight (the first input channel's slice), no bias
        part = conv_with(conv, x[:, :1], conv.weight[:, :1], None)
    assert torch.allclose(part, F.conv3d(x[:, :1], conv.weight[:, :1], None, stride, dilation, dilation), atol=1e-5)


def test_only_batch_one_3d_inference_with_a_kernel_of_several_voxels_goes_to_onednn():
    w = torch.randn(4, 2, 3, 3, 3)
    with torch.no_grad():
        assert prefers_onednn(torch.randn(1, 16, 5, 5, 5), torch.randn(4, 16, 3, 3, 3), 1) == \
            torch.backends.mkldnn.is_available()  # many channels too
        assert not prefers_onednn(torch.randn(2, 2, 5, 5, 5), w, 1)  # PyTorch already picks oneDNN for batch > 1
        assert not prefers_onednn(torch.randn(1, 16, 5, 5, 5), torch.randn(4, 16, 1, 1, 1), 1)  # 1x1x1: slower there
        assert not prefers_onednn(torch.randn(1, 4, 5, 5, 5), torch.randn(4, 1, 3, 3, 3), 4)  # grouped: same code
        assert not prefers_onednn(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), 1)  # 2D
        assert not prefers_onednn(torch.randn(1, 2, 5, 5, 5).double(), w.double(), 1)
    assert not prefers_onednn(torch.randn(1, 2, 5, 5, 5), w, 1)  # autograd on: the training path is untouched


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_inference_conv3d_equals_conv3d_and_shares_its_parameters(padding_mode):
    conv = nn.Conv3d(16, 8, 3, 1, padding=2, dilation=2, padding_mode=padding_mode)
    fast = InferenceConv3d.from_conv(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    assert fast.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(1, 16, 7, 9, 8)
    with torch.inference_mode():
        assert torch.allclose(fast(x), conv(x), atol=1e-4)
    y = torch.randn(1, 16, 7, 9, 8, requires_grad=True)  # training: nn.Conv3d's own path, the same gradient
    fast(y).square().sum().backward()
    g = y.grad.clone()
    y.grad = None
    conv(y).square().sum().backward()
    assert torch.equal(g, y.grad)


def test_use_onednn_convs_keeps_names_and_outputs_of_a_vector_field():
    torch.manual_seed(0)
    kw = dict(input_channels=1, num_classes=3, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d,
              kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
              norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
              time_scaled_x_t=True)
    net = VectorFieldUNet(**kw).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert all(type(m) is InferenceConv3d for m in convs if m.weight.shape[2:].numel() > 1)
    plain = VectorFieldUNet(**kw).eval()  # the same modules as nn.Conv3d: undo the swap on a copy
    for name, module in list(plain.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is InferenceConv3d:
                swapped = nn.Conv3d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                    child.padding, child.dilation, child.groups, child.bias is not None)
                setattr(module, child_name, swapped)
    plain.load_state_dict(net.state_dict())
    assert net.state_dict().keys() == plain.state_dict().keys()
    x, x_t, t = torch.randn(1, 1, 16, 20, 12), torch.randn(1, 3, 16, 20, 12), torch.tensor([0.3])
    with torch.inference_mode():
        assert torch.allclose(net(x, x_t, t), plain(x, x_t, t), atol=1e-4)
    assert use_onednn_convs(nn.Sequential(nn.Conv2d(1, 2, 3)))[0].__class__ is nn.Conv2d  # 2D untouched
