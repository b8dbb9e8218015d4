"""``conv_with``: a conv module's convolution with another weight; oneDNN for batch-1 few-channel 3D inference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medflowseg_nn.networks.layers import conv_with, prefers_onednn


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


def test_only_batch_one_few_channel_3d_inference_goes_to_onednn():
    w = torch.randn(4, 2, 3, 3, 3)
    with torch.no_grad():
        assert not prefers_onednn(torch.randn(2, 2, 5, 5, 5), w, 1)  # PyTorch already picks oneDNN for batch > 1
        assert not prefers_onednn(torch.randn(1, 16, 5, 5, 5), torch.randn(4, 16, 3, 3, 3), 1)  # many channels
        assert not prefers_onednn(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), 1)  # 2D
        assert not prefers_onednn(torch.randn(1, 2, 5, 5, 5).double(), w.double(), 1)
    assert not prefers_onednn(torch.randn(1, 2, 5, 5, 5), w, 1)  # autograd on: the training path is untouched
