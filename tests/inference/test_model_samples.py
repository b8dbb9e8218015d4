"""Model samples (MC dropout): the dropout option, the seeded per-sample thinned networks, and the refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medflowseg_nn.config import FlowMatchingConfig, NetworkOptions
from medflowseg_nn.errors import UserError
from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.inference.model_samples import DROPOUT_SEED_OFFSET, dropout_layers, sampled_dropout
from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.model import architecture_kwargs
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from tests.inference.test_sampler import SPATIAL, tiny_field

P = 0.3


def dropout_field(seed: int = 0, p: float = P) -> VectorFieldUNet:
    """A tiny time-scaled 3D field with channel dropout ``p`` in its conv blocks (``tiny_field``)."""
    return tiny_field(seed, time_scaled_x_t=True, dropout_op=nn.Dropout3d if p else None,
                      dropout_op_kwargs={"p": p} if p else None)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *SPATIAL, generator=torch.Generator().manual_seed(3))


def segmenter(field: nn.Module, k: int, steps: int = 1, model_samples: bool = True) -> FlowSegmenter:
    return FlowSegmenter(field, 3, "x1", solver=SolverConfig(steps=steps), seed=5, num_samples=k,
                         model_samples=model_samples)


@pytest.mark.parametrize("conv,dropout", [(nn.Conv2d, nn.Dropout2d), (nn.Conv3d, nn.Dropout3d)])
def test_the_network_option_puts_channel_dropout_into_the_architecture(conv, dropout):
    cm = type("CM", (), {"network_arch_init_kwargs": {"conv_op": f"torch.nn.{conv.__name__}", "dropout_op": None},
                         "network_arch_init_kwargs_req_import": ["conv_op", "dropout_op"]})()
    kwargs = architecture_kwargs(cm, NetworkOptions(dropout=0.1))
    assert kwargs["dropout_op"] is dropout and kwargs["dropout_op_kwargs"]["p"] == 0.1
    assert "dropout" not in kwargs
    assert architecture_kwargs(cm, NetworkOptions())["dropout_op"] is None  # the default: none
    with pytest.raises(ValueError, match="dropout"):
        NetworkOptions(dropout=1.0)
    assert FlowMatchingConfig.from_dict({"network": {"use_dbsa": True}}).network.dropout == 0.0  # an older block


def test_dropout_changes_nothing_in_eval_mode_and_one_sample_is_the_seeded_thinned_network(image):
    field = dropout_field()
    plain = copy.deepcopy(field)  # the same weights without dropout (the state dict keys differ: not loadable)
    for m in dropout_layers(plain):
        m.p = 0.0
    assert len(dropout_layers(field)) > 0 and not dropout_layers(plain)
    assert torch.equal(segmenter(field, 1, model_samples=False)(image), segmenter(plain, 1, model_samples=False)(image))
    # by hand: the one-step sample of a model sample is the field with its dropout layers on, seeded as documented
    torch.manual_seed(5 + 0 + DROPOUT_SEED_OFFSET)
    for m in dropout_layers(field):
        m.train()
    expected = segmenter(field, 1, model_samples=False)(image)
    field.eval()
    got = segmenter(field, 1)(image)
    assert torch.equal(got, expected) and not torch.allclose(got, segmenter(field, 1, model_samples=False)(image))


@pytest.mark.parametrize("steps", [1, 2])
def test_model_samples_differ_are_deterministic_and_fixed_members(image, steps):
    field = dropout_field()
    log_p = segmenter(field, 3, steps).sample_log_probabilities(image)
    assert log_p.shape == (3, 2, 3, *SPATIAL) and torch.isfinite(log_p).all()
    assert torch.allclose(log_p.exp().sum(2), torch.ones(()), atol=1e-5)
    assert not torch.allclose(log_p[0], log_p[1]) and not torch.allclose(log_p[1], log_p[2])
    torch.manual_seed(123)  # whatever ran before: the same samples
    before = torch.random.get_rng_state()
    again = segmenter(field, 3, steps).sample_log_probabilities(image)
    assert torch.equal(again, log_p)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    assert not field.training and not any(m.training for m in dropout_layers(field))
    # sample k is the same thinned network whatever K is: a fixed member per sample
    assert torch.equal(segmenter(field, 2, steps).sample_log_probabilities(image), log_p[:2])


def test_k_one_step_model_samples_cost_k_evaluations(image):
    field = dropout_field()
    calls = []
    handle = field.register_forward_hook(lambda *_: calls.append(1))
    segmenter(field, 4)(image)
    assert len(calls) == 4
    calls.clear()
    segmenter(field, 4, model_samples=False)(image)  # the prior-free start: one shared evaluation
    assert len(calls) == 1
    handle.remove()


def test_model_samples_are_refused_without_dropout(image):
    with pytest.raises(ValueError, match="dropout"):
        segmenter(dropout_field(p=0.0), 2)
    with pytest.raises(ValueError, match="dropout"):
        with sampled_dropout(dropout_field(p=0.0), 0, torch.device("cpu")):
            pass
    predictor = MedFlowSegPredictor(device=torch.device("cpu"), num_samples=2, model_samples=True)
    with pytest.raises(UserError, match="--mc_dropout"):
        predictor.make_segmenter(dropout_field(p=0.0), plans_manager=_Plans(), dataset_json={})


def test_temperature_settings_name_model_samples_only_when_on():
    solver = SolverConfig(steps=1)
    assert "model_samples" not in MedFlowSegPredictor.sampler_settings(solver, 4)
    assert MedFlowSegPredictor.sampler_settings(solver, 4, model_samples=True)["model_samples"] is True


class _Plans:
    """The two things ``make_segmenter`` reads of a PlansManager."""
    plans: dict = {}

    def get_label_manager(self, dataset_json):
        return type("LM", (), {"num_segmentation_heads": 3, "has_regions": False})()
