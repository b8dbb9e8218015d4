"""FlowSegmenter: seeded priors, batched K-sample generation, valid probabilities, the one-step x1 path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.flow.solver import SolverConfig, sample_prior
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.inference.uncertainty import pairwise_disagreement, predictive_entropy

SPATIAL = (8, 12, 8)


def tiny_field(seed: int = 0, **options) -> VectorFieldUNet:
    """An untrained 3-stage 3D field whose zero-initialised parameters are perturbed, so that it depends on x_t.
    ``options``: further :class:`VectorFieldUNet` keywords (dropout, time-scaled input, ...)."""
    torch.manual_seed(seed)
    n = 3
    net = VectorFieldUNet(1, 3, n_stages=n, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d,
                          kernel_sizes=[[3] * 3] * n, strides=[[1] * 3] + [[2] * 3] * (n - 1),
                          n_conv_per_stage=[1] * n, n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True,
                          norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                          nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, time_embed_dim=16, **options).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return net


class CountingField(nn.Module):
    """Wraps a field and records the batch size of every call."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field, self.batches = field, []

    def forward(self, image, x_t, t):
        self.batches.append(image.shape[0])
        return self.field(image, x_t, t)


@pytest.fixture(scope="module")
def field() -> VectorFieldUNet:
    return tiny_field()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *SPATIAL, generator=torch.Generator().manual_seed(1))


def test_prior_is_seeded_cached_and_sample_major(field):
    seg = FlowSegmenter(field, 3, "x1", seed=7, num_samples=3)
    prior = seg.prior(2, SPATIAL, torch.device("cpu"), torch.float32)
    assert prior.shape == (6, 3, *SPATIAL)
    assert seg.prior(2, SPATIAL, torch.device("cpu"), torch.float32) is prior  # cached
    for k in range(3):
        expected = sample_prior((1, 3, *SPATIAL), 7 + k)
        assert torch.equal(prior[2 * k], expected[0]) and torch.equal(prior[2 * k + 1], expected[0])
    seg.seed = 8  # a new seed must not reuse the cached prior
    assert not torch.equal(seg.prior(2, SPATIAL, torch.device("cpu"), torch.float32), prior)


@torch.no_grad()
def test_same_seed_identical_different_seed_differs(field, image):
    out = [FlowSegmenter(field, 3, "x1", seed=s, num_samples=2)(image) for s in (0, 0, 1)]
    assert torch.equal(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


@torch.no_grad()
def test_k_samples_are_one_batched_call_and_average_probabilities(field, image):
    counting = CountingField(field)
    seg = FlowSegmenter(counting, 3, "x1", seed=0, num_samples=4, samples_per_call=4)
    out = seg.sample(image)
    log_p = out.mean_log_probabilities
    assert counting.batches == [4 * 2]  # one network call with all K samples of both images
    samples = out.sample_log_probabilities.exp()
    assert samples.shape == (4, 2, 3, *SPATIAL)
    assert torch.allclose(samples.sum(2), torch.ones(()), atol=1e-5)
    assert log_p.shape == (2, 3, *SPATIAL)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(()), atol=1e-5)
    assert torch.allclose(log_p.exp(), samples.mean(0), atol=1e-6)
    # sample 0 of a K-sample batch is the single-sample prediction with the same seed
    single = FlowSegmenter(field, 3, "x1", seed=0, num_samples=1)(image)
    assert torch.allclose(samples[0].log(), single, atol=1e-4)
    assert not torch.allclose(samples[0], samples[1])  # the field depends on x_t: samples differ


@pytest.mark.parametrize("solver", [SolverConfig(), SolverConfig(2, "heun")], ids=["one_step", "heun2"])
@pytest.mark.parametrize("samples_per_call,calls", [(None, [2, 2, 2, 2]), (1, [2, 2, 2, 2]), (3, [6, 2]),
                                                    (4, [8]), (9, [8])])
@torch.no_grad()
def test_samples_per_call_splits_the_calls_not_the_result(field, image, solver, samples_per_call, calls):
    """On CPU the default is one sample per call; any chunking gives the batched samples (same seeded priors)."""
    batched = FlowSegmenter(field, 3, "x1", solver, seed=0, num_samples=4, samples_per_call=4).sample(image)
    counting = CountingField(field)
    seg = FlowSegmenter(counting, 3, "x1", solver, seed=0, num_samples=4, samples_per_call=samples_per_call)
    out = seg.sample(image)
    # chunk after chunk, each solved whole (Heun N = 2: 4 field evaluations per chunk)
    assert counting.batches == [b for b in calls for _ in range(solver.num_evaluations)]
    # compared as probabilities: float rounding of another batch size moves log p ~ -10 by ~1e-2 (p by ~1e-5)
    assert torch.allclose(out.sample_log_probabilities.exp(), batched.sample_log_probabilities.exp(), atol=1e-4)
    assert torch.allclose(out.mean_log_probabilities.exp(), batched.mean_log_probabilities.exp(), atol=1e-4)


def test_samples_per_call_must_be_positive(field):
    with pytest.raises(ValueError, match="samples_per_call"):
        FlowSegmenter(field, 3, "x1", num_samples=2, samples_per_call=0)


@torch.no_grad()
def test_one_step_x1_equals_log_softmax_of_raw_output(field, image):
    seg = FlowSegmenter(field, 3, "x1", seed=3)
    x0 = sample_prior((1, 3, *SPATIAL), 3).expand(2, -1, -1, -1, -1)
    raw = field(image, x0, torch.zeros(2))
    assert torch.allclose(seg(image), torch.log_softmax(raw, 1), atol=1e-6)


@pytest.mark.parametrize("parameterization,solver", [("x1", SolverConfig(3, "heun", euler_last_step=True)),
                                                     ("velocity", SolverConfig()),
                                                     ("velocity", SolverConfig(2, "euler"))])
@torch.no_grad()
def test_other_paths_give_valid_probabilities(field, image, parameterization, solver):
    log_p = FlowSegmenter(field, 3, parameterization, solver, seed=0, num_samples=2)(image)
    assert log_p.shape == (2, 3, *SPATIAL) and torch.isfinite(log_p).all()
    assert torch.allclose(log_p.exp().sum(1), torch.ones(()), atol=1e-4)


def test_state_dict_is_the_fields(field):
    seg = FlowSegmenter(tiny_field(1), 3, "x1")
    seg.load_state_dict(field.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(seg.state_dict().values(), field.state_dict().values()))
    with pytest.raises(ValueError, match="num_samples"):
        FlowSegmenter(field, 3, "x1", num_samples=0)


def test_disagreement_and_entropy_formulas():
    labels = torch.tensor([[0, 0, 1], [0, 1, 2], [0, 1, 0]])  # K = 3 samples, 3 voxels
    # voxel 0: all agree; voxel 1: labels 0, 1, 1 -> 2 of 3 pairs differ; voxel 2: labels 1, 2, 0 -> all differ
    assert torch.allclose(pairwise_disagreement(labels, 3), torch.tensor([0.0, 2 / 3, 1.0]))
    assert torch.equal(pairwise_disagreement(labels[:1], 3), torch.zeros(3))
    probs = torch.tensor([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    assert torch.allclose(torch.from_numpy(predictive_entropy(probs)),
                          torch.tensor([0.0, 0.693147, 1.098612]), atol=1e-5)


class ProjectionCounter(nn.Module):
    """A field exposing the split first convolution that counts how often the x_t projection is computed."""

    def __init__(self, field: VectorFieldUNet):
        super().__init__()
        self.field, self.projections, self.given = field, 0, []

    def x_t_projection(self, x_t):
        self.projections += 1
        return self.field.x_t_projection(x_t)

    def x_t_projection_state(self):
        return self.field.x_t_projection_state()

    def forward(self, image, x_t, t, x_t_projection=None):
        self.given.append(x_t_projection is not None)
        return self.field(image, x_t, t, x_t_projection=x_t_projection)


def test_one_step_reuses_the_prior_projection_until_the_weights_change(image):
    counter = ProjectionCounter(tiny_field(seed=5))
    seg = FlowSegmenter(counter, 3, "x1", seed=0, num_samples=2, samples_per_call=2)
    with torch.no_grad():
        first = seg(image)
        assert torch.equal(seg(image), first)
        assert counter.projections == 1 and counter.given == [True, True]  # one conv for two patches
        # same output as the concatenated-input network, up to float rounding
        reference = FlowSegmenter(CountingField(counter.field), 3, "x1", seed=0, num_samples=2)(image)
        assert torch.allclose(first, reference, atol=1e-5)
        counter.field.load_state_dict(tiny_field(seed=6).state_dict())  # as nnU-Net's predictor does per fold
        after = seg(image)
        assert counter.projections == 2
        assert torch.allclose(after, FlowSegmenter(CountingField(counter.field), 3, "x1", num_samples=2)(image),
                              atol=1e-5)
        seg.seed = 4  # another prior: another projection
        seg(image)
        assert counter.projections == 3
    seg(image)  # with gradients recorded nothing cached is used
    assert counter.projections == 3 and counter.given[-1] is False


@pytest.mark.parametrize("solver", [SolverConfig(), SolverConfig(2, "heun")], ids=["1step", "heun2"])
def test_a_sharing_field_gets_each_image_once_for_k_samples(image, solver):
    field = tiny_field(seed=7)
    assert field.shares_image_across_samples
    batches = []
    field.register_forward_pre_hook(lambda module, args: batches.append((args[0].shape[0], args[1].shape[0])))
    with torch.no_grad():
        shared = FlowSegmenter(field, 3, "x1", solver=solver, seed=0, num_samples=4, samples_per_call=4).sample(image)
        repeated = FlowSegmenter(CountingField(field), 3, "x1", solver=solver, seed=0, num_samples=4,
                                 samples_per_call=4).sample(image)
    first_calls = batches[: len(batches) // 2]
    assert first_calls and all(b == (2, 8) for b in first_calls)  # 2 images, 4 x 2 x_t
    assert torch.allclose(shared.sample_log_probabilities, repeated.sample_log_probabilities, atol=1e-5)


@torch.no_grad()
def test_a_time_scaled_field_runs_one_step_once_for_all_k_samples(image, caplog):
    """With ``time_scaled_x_t`` the t = 0 output ignores the prior: K one-step samples are one evaluation, the
    same as K = 1; with two steps the samples differ again (x_t at t > 0 carries the prior)."""
    scaled = tiny_field()
    scaled.time_scaled_x_t = True
    counting = CountingField(scaled)
    counting.time_scaled_x_t = True  # what the sampler reads from the field it wraps
    with caplog.at_level("WARNING", logger="medflowseg_nn.inference.sampler"):
        seg = FlowSegmenter(counting, 3, "x1", SolverConfig(), seed=0, num_samples=4)
    assert "identical" in caplog.text
    out = seg.sample(image)
    assert counting.batches == [2] and out.sample_log_probabilities.shape == (4, 2, 3, *SPATIAL)
    one = FlowSegmenter(scaled, 3, "x1", SolverConfig(), seed=5, num_samples=1).sample(image)
    assert torch.allclose(out.sample_log_probabilities, one.sample_log_probabilities.expand(4, -1, -1, -1, -1, -1),
                          atol=1e-5)
    assert torch.allclose(out.mean_log_probabilities, one.mean_log_probabilities, atol=1e-5)
    two = FlowSegmenter(scaled, 3, "x1", SolverConfig(2, "euler", euler_last_step=True), seed=0,
                        num_samples=2).sample(image).sample_log_probabilities
    assert not torch.allclose(two[0], two[1], atol=1e-4)


class PlainView(nn.Module):
    """The same field, hidden behind a wrapper that does not say it is time-scaled: the sampler evaluates every
    sample at every step (the reference for the shared start)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, image, x_t, t):
        return self.field(image, x_t, t)


@pytest.mark.parametrize("solver", [SolverConfig(2, "euler"), SolverConfig(3, "heun", euler_last_step=True),
                                    SolverConfig(2, "euler", path_mean=True)])
@torch.no_grad()
def test_k_samples_of_a_time_scaled_field_share_the_t0_evaluation(image, solver):
    """The t = 0 output of a time-scaled field is computed once for all K samples: Euler N steps cost
    1 + K·(N − 1) network calls instead of K·N, with the same samples as evaluating every one."""
    scaled = tiny_field()
    scaled.time_scaled_x_t = True
    counting = CountingField(scaled)
    counting.time_scaled_x_t = True
    k = 4
    shared = FlowSegmenter(counting, 3, "x1", solver, seed=0, num_samples=k, samples_per_call=1).sample(image)
    reference = FlowSegmenter(PlainView(scaled), 3, "x1", solver, seed=0, num_samples=k,
                              samples_per_call=1).sample(image)
    assert len(counting.batches) == 1 + k * (solver.num_evaluations - 1)
    assert torch.allclose(shared.sample_log_probabilities, reference.sample_log_probabilities, atol=1e-5)
    assert not torch.allclose(shared.sample_log_probabilities[0], shared.sample_log_probabilities[1], atol=1e-4)
    # a VectorFieldUNet itself gets x_t=None at t = 0 (the image alone through the first convolution)
    direct = FlowSegmenter(scaled, 3, "x1", solver, seed=0, num_samples=k).sample(image)
    assert torch.allclose(direct.sample_log_probabilities, reference.sample_log_probabilities, atol=1e-5)


@torch.no_grad()
def test_one_step_velocity_samples_of_a_time_scaled_field_keep_their_own_prior(image):
    """With the velocity output, x̂1 = x0_k + v: one shared t = 0 evaluation, but K different samples."""
    scaled = tiny_field()
    scaled.time_scaled_x_t = True
    counting = CountingField(scaled)
    counting.time_scaled_x_t = True
    out = FlowSegmenter(counting, 3, "velocity", SolverConfig(), seed=0, num_samples=3).sample(image)
    reference = FlowSegmenter(PlainView(scaled), 3, "velocity", SolverConfig(), seed=0, num_samples=3,
                              samples_per_call=1).sample(image)
    assert counting.batches == [2]
    assert torch.allclose(out.sample_log_probabilities, reference.sample_log_probabilities, atol=1e-5)
    assert not torch.allclose(out.sample_log_probabilities[0], out.sample_log_probabilities[1], atol=1e-4)


@pytest.mark.parametrize("time_scaled", [False, True])
@torch.no_grad()
def test_path_mean_averages_the_one_step_and_the_two_step_probabilities(image, time_scaled):
    """x1 output, Euler N = 2: the estimates are the one-step x̂1 (t = 0) and the last step's x̂1 (t = 0.5), so
    the path mean's probabilities are the mean of the one-step and the two-step ones (up to the eps clamp)."""
    field = tiny_field(2, time_scaled_x_t=True) if time_scaled else tiny_field(2)
    run = lambda solver: FlowSegmenter(field, 3, "x1", solver, seed=4)(image).exp()  # noqa: E731
    one, two = run(SolverConfig()), run(SolverConfig(2, euler_last_step=True))
    mean = run(SolverConfig(2, euler_last_step=True, path_mean=True))
    assert not torch.allclose(one, two, atol=1e-3)  # the two estimates differ: the test can tell them apart
    assert torch.allclose(mean, (one + two) / 2, atol=5e-4)
    assert torch.allclose(run(SolverConfig(path_mean=True)), one, atol=1e-6)  # one step: the same output
