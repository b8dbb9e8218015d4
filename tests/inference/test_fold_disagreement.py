"""``MedFlowSegPredictor`` with several folds: the disagreement map counts the (fold, sample) members' pairs, within
and across folds (fabricated, differently perturbed fold checkpoints of tiny plans; see ``test_predictor.py``)."""
from __future__ import annotations

import shutil

import pytest
import torch

from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.inference.uncertainty import (SampleAccumulator, class_votes, mask_votes_disagreement,
                                                 pairwise_disagreement, region_disagreement, votes_disagreement)
from tests.inference.test_predictor import env  # noqa: F401 - the module-scoped fixture, instantiated here

DATA = torch.randn(1, 16, 20, 16, generator=torch.Generator().manual_seed(4))  # >= patch: 2 x 2 x 2, no padding


@pytest.fixture(scope="module")
def two_folds(env):  # noqa: F811 - pytest fixture argument
    """A fold_1 whose weights differ from fold_0's, so the folds disagree somewhere."""
    fold0 = env.model / "fold_0" / "checkpoint_final.pth"
    (env.model / "fold_1").mkdir(exist_ok=True)
    ckpt = torch.load(fold0, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(11)
    ckpt["network_weights"] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                               else v for k, v in ckpt["network_weights"].items()}
    torch.save(ckpt, env.model / "fold_1" / "checkpoint_final.pth")
    yield env
    shutil.rmtree(env.model / "fold_1")


def predictor_for(env, folds, num_samples: int) -> MedFlowSegPredictor:
    predictor = MedFlowSegPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False,
                                    use_mirroring=False, num_samples=num_samples, seed=3)
    predictor.initialize_from_trained_model_folder(str(env.model), folds)
    return predictor


def test_vote_formulas_match_pairwise_definitions():
    labels = torch.randint(0, 3, (5, 7, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(votes_disagreement(class_votes(labels, 3), 5), pairwise_disagreement(labels, 3))
    brute = sum((labels[i] != labels[j]).float() for i in range(5) for j in range(i + 1, 5)) / 10
    assert torch.allclose(pairwise_disagreement(labels, 3), brute)
    masks = labels[:, None].repeat(1, 2, 1, 1) == torch.tensor([1, 2])[None, :, None, None]
    assert torch.equal(mask_votes_disagreement(masks.float().sum(0), 5), region_disagreement(masks))
    halves = class_votes(labels[:2], 3) + class_votes(labels[2:], 3)  # votes add up over folds
    assert torch.equal(votes_disagreement(halves, 5), pairwise_disagreement(labels, 3))


def test_two_folds_k_samples_count_every_fold_sample_pair(two_folds, monkeypatch):
    captured = []
    original = SampleAccumulator.votes
    monkeypatch.setattr(SampleAccumulator, "votes",
                        lambda self: captured.append(self.sum.argmax(1).clone()) or original(self))
    out = predictor_for(two_folds, [0, 1], num_samples=2).predict_case(DATA, with_disagreement=True)
    assert len(captured) == 2  # one [K, *S] label stack per fold
    members = torch.cat(captured)  # 4 members: (fold 0, seed 3), (fold 0, seed 4), (fold 1, seed 3), (fold 1, seed 4)
    assert torch.allclose(out.disagreement, pairwise_disagreement(members, 3), atol=1e-6)
    within = torch.stack([pairwise_disagreement(m, 3) for m in captured]).mean(0)  # the former fold mean
    assert not torch.allclose(out.disagreement, within), "the folds should add disagreement between them"
    single = predictor_for(two_folds, [0], num_samples=2).predict_case(DATA, with_disagreement=True)
    assert torch.allclose(single.disagreement, pairwise_disagreement(captured[0], 3), atol=1e-6)


def test_two_folds_one_sample_each_is_the_fold_disagreement(two_folds):
    out = predictor_for(two_folds, [0, 1], num_samples=1).predict_case(DATA, with_disagreement=True)
    labels = torch.stack([predictor_for(two_folds, [f], 1).predict_case(DATA).logits.float().argmax(0)
                          for f in (0, 1)])
    assert torch.equal(out.disagreement, (labels[0] != labels[1]).float())
    assert out.disagreement.any()
