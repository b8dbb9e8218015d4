"""The planner's VRAM estimate of VectorFieldUNet against the activations autograd really saves.

nnU-Net's reference values were calibrated on PlainConvUNet's ``compute_conv_feature_map_size``, so our estimate
(the network's feature maps + the image ⊕ x_t input, as ``MedFlowSegPlanner`` computes it) is safe iff
measured / estimate for our network is not larger than the same ratio for PlainConvUNet on the same stages.
"""
from __future__ import annotations

import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from medflowseg_nn.profiling.memory import count_saved_tensors, measure_saved_for_backward
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from tests.networks.test_vector_field_unet import tiny_kwargs

IN_CH, N_CLASSES = 2, 3
VARIANTS = {"dbsa_faa": {}, "no_attention": {"dbsa_stages": [], "faa_stages": []}}
SPATIAL = {2: (32, 40), 3: (16, 20, 16)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ratios(dim: int, variant: str) -> tuple[float, float, dict]:
    spatial = SPATIAL[dim]
    torch.manual_seed(0)
    kwargs = tiny_kwargs(dim)
    ours = VectorFieldUNet(IN_CH, N_CLASSES, **kwargs, **VARIANTS[variant])
    assert (len(ours.dbsa) > 0 and len(ours.faa) > 0) == (variant == "dbsa_faa")
    inputs = (torch.randn(1, IN_CH, *spatial), torch.randn(1, N_CLASSES, *spatial), torch.rand(1))
    measured_ours = measure_saved_for_backward(ours, inputs).elements
    # MedFlowSegPlanner.static_estimate_VRAM_usage: feature maps + the input tensor with its x_t channels
    estimate_ours = int(ours.compute_conv_feature_map_size(spatial)) + math.prod([IN_CH + N_CLASSES, *spatial])

    plain_kwargs = {k: v for k, v in kwargs.items() if k != "time_embed_dim"}
    plain = PlainConvUNet(IN_CH, num_classes=N_CLASSES, deep_supervision=False, **plain_kwargs)
    measured_plain = measure_saved_for_backward(plain, (torch.randn(1, IN_CH, *spatial),)).elements
    estimate_plain = int(plain.compute_conv_feature_map_size(spatial))  # nnU-Net's estimate: no input channels
    numbers = dict(measured_ours=measured_ours, estimate_ours=estimate_ours, measured_plain=measured_plain,
                   estimate_plain=estimate_plain)
    return measured_ours / estimate_ours, measured_plain / estimate_plain, numbers


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dim", [2, 3])
def test_estimate_covers_saved_activations_like_plain_unet(dim: int, variant: str) -> None:
    ratio_ours, ratio_plain, numbers = _ratios(dim, variant)
    # our estimate may under-count by at most 10 % more than PlainConvUNet's (which the reference values absorb)
    assert ratio_ours <= ratio_plain * 1.10, (ratio_ours, ratio_plain, numbers)
    # ... and must not be absurdly large (it would shrink patch / batch for nothing)
    assert numbers["estimate_ours"] <= 4 * numbers["measured_ours"], numbers


def test_counts_each_storage_once_complex_as_two_reals_and_parameters_apart() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    w = nn.Parameter(torch.randn(4, 6))
    with count_saved_tensors(exclude=[w]) as stats:
        y = (x @ w).exp()  # mm saves x (20) and w (a parameter); exp saves its result y (30)
        y[:, :3].sin()  # saves a view of y: same storage, not counted again
    assert (stats.elements, stats.bytes, stats.n_saved, stats.n_storages) == (50, 200, 4, 2)
    assert stats.param_bytes == w.numel() * 4
    with count_saved_tensors() as spectral:
        c = torch.fft.rfft(x, dim=1)  # [5, 3] complex64
        c * c  # saves c twice: one storage
    assert spectral.bytes_by_dtype["complex64"] == 15 * 8
    assert spectral.elements == 20 + 2 * 15  # x and c, a complex value counted as two reals


def test_measure_runs_backward_and_restores_mode() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(inplace=True)).eval()
    x = torch.randn(1, 1, 8, 8)
    stats = measure_saved_for_backward(net, (x,))
    # conv saves its input x (64); the in-place LeakyReLU's result shares the conv output's storage (4 * 64)
    assert stats.elements == 64 + 4 * 64
    assert not net.training and all(p.grad is None for p in net.parameters())
