"""``MedFlowSegTrainer.train_step`` / ``validation_step`` on real batches of the trainer's own dataloaders.

A tiny planned and preprocessed synthetic dataset; the network is shrunk in the plans for speed. The trainer is
initialised as nnU-Net does it (``initialize()``: network, optimizer, loss); the batches come from
``get_dataloaders()`` (nnU-Net's augmentation, single-threaded).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medflowseg_nn.flow.path import LinearPath
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from medflowseg_nn.trainers.variants import (MedFlowSegTrainer_noDeepSupervision, MedFlowSegTrainer_ownEstimate,
                                            MedFlowSegTrainer_velocity)
from tests.conftest import plan_synthetic_dataset, tiny_network_plans

CONFIG = "3d_fullres"


class VelocityNoDeepSupervision(MedFlowSegTrainer_velocity):
    """The velocity variant on a single full-resolution target (deep supervision is tested on its own)."""
    network_overrides = {**MedFlowSegTrainer_velocity.network_overrides, "deep_supervision": False}


SINGLE_TARGET = [MedFlowSegTrainer_noDeepSupervision, VelocityNoDeepSupervision]
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield plan_synthetic_dataset(tmp_path_factory.mktemp("train_step"), mp, 982)


def make_trainer(planned, cls=MedFlowSegTrainer):
    plans = tiny_network_plans(planned.plans)
    trainer = cls(plans, CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def real_batches(trainer) -> tuple[dict, dict]:
    train_loader, val_loader = trainer.get_dataloaders()
    return next(train_loader), next(val_loader)


@pytest.mark.parametrize("cls", SINGLE_TARGET, ids=lambda c: c.__name__)
def test_train_step_returns_the_batch_loss_and_updates_the_network(planned, cls):
    trainer = make_trainer(planned, cls)
    batch, _ = real_batches(trainer)
    patch = tuple(trainer.configuration_manager.patch_size)
    assert batch["data"].shape == (trainer.configuration_manager.batch_size, 1, *patch)
    assert batch["target"].shape == (batch["data"].shape[0], 1, *patch)  # no deep-supervision list
    assert set(batch["target"].unique().tolist()) <= {0, 1, 2}

    before = {k: v.detach().clone() for k, v in trainer.network.named_parameters()}
    torch.manual_seed(123)  # _flow_loss draws x0 and t from the global generator
    with torch.no_grad():
        expected = trainer._flow_loss(batch["data"], batch["target"])["loss"].item()
    torch.manual_seed(123)
    out = trainer.train_step(batch)
    assert set(out) == {"loss"} and isinstance(out["loss"], np.ndarray) and out["loss"].shape == ()
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert out["loss"] == pytest.approx(expected, rel=1e-5)  # the loss of this batch before the update

    # conv biases directly followed by an instance norm have a mathematically zero gradient (the norm subtracts
    # the mean); numerically it is ~1e-9 or exactly 0, so they are left out of the checks below
    params = {k: p for k, p in trainer.network.named_parameters() if not k.endswith(".conv.bias")}
    changed = {k for k, p in params.items() if not torch.equal(p.detach(), before[k])}
    # the plain U-Net path learns from the first step (the attention branches and the time MLP sit behind
    # zero-initialised projections, so they only get gradients once those have moved)
    main_path = {k for k in params if k.split(".")[0] in ("encoder", "decoder", "upsample", "seg_head")}
    assert len(main_path) > 10 and main_path <= changed, sorted(main_path - changed)
    delta = max((params[k].detach() - before[k]).abs().max().item() for k in changed)
    assert 0 < delta < 1
    # after a second step every parameter gets a gradient: nothing in the network is dead
    assert np.isfinite(trainer.train_step(batch)["loss"])
    dead = [k for k, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead
    unchanged = [k for k, p in params.items() if torch.equal(p.detach(), before[k])]
    assert not unchanged, unchanged


def hand_stats(pred: torch.Tensor, seg: torch.Tensor) -> np.ndarray:
    """[3, K-1] tp, fp, fn of integer maps ``pred`` and ``seg`` (same shape), foreground classes only."""
    rows = []
    for c in range(1, NUM_CLASSES):
        p, s = pred == c, seg == c
        rows.append([(p & s).sum().item(), (p & ~s).sum().item(), (~p & s).sum().item()])
    return np.array(rows, dtype=np.float64).T


@pytest.mark.parametrize("cls", SINGLE_TARGET, ids=lambda c: c.__name__)
def test_validation_step_is_one_step_inference_from_the_seeded_prior(planned, cls):
    trainer = make_trainer(planned, cls)
    _, batch = real_batches(trainer)
    trainer.val_multistep_steps = 2  # the multi-step Dice of the first batches: 2 Euler steps are enough here
    trainer.on_validation_epoch_start()
    assert not trainer.network.training
    out = trainer.validation_step(batch)
    assert set(out) == {"loss", "tp_hard", "fp_hard", "fn_hard"}
    for key in ("tp_hard", "fp_hard", "fn_hard"):
        assert out[key].shape == (NUM_CLASSES - 1,)
    assert np.isfinite(out["loss"]) and out["loss"].shape == ()

    # by hand: x0 ~ N(0, I) from a CPU generator seeded with the plans' prior seed, t = 0, argmax of the output
    image, seg = batch["data"], batch["target"][:, 0].long()
    shape = (image.shape[0], NUM_CLASSES, *image.shape[2:])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(trainer.flow_config.prior_seed))
    t0 = torch.zeros(image.shape[0])
    with torch.no_grad():
        raw = trainer.network(image, x0, t0)
    # x1: the output is the clean-mask logits; velocity: x̂1 = x0 + (1 - 0) v
    pred = raw.argmax(1) if cls.flow_overrides.get("parameterization", "x1") == "x1" else (x0 + raw).argmax(1)
    stats = hand_stats(pred, seg)
    assert np.array_equal(np.stack([out["tp_hard"], out["fp_hard"], out["fn_hard"]]), stats)
    counts = np.array([(seg == c).sum().item() for c in range(1, NUM_CLASSES)])
    assert np.array_equal(out["tp_hard"] + out["fn_hard"], counts) and counts.min() > 0
    assert out["tp_hard"].sum() + out["fp_hard"].sum() == (pred > 0).sum().item()

    x1 = torch.nn.functional.one_hot(seg, NUM_CLASSES).movedim(-1, 1).float() * 2 - 1
    with torch.no_grad():
        loss = trainer.loss(raw, LinearPath().sample(x0, x1, t0), batch["target"])["loss"]
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)

    # deterministic: the same batch gives the same numbers; the multi-step Dice counts the same ground truth
    again = trainer.validation_step(batch)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert len(trainer._multistep_stats) == 2
    ms_tp, _, ms_fn = trainer._multistep_stats[0]
    assert np.array_equal(ms_tp + ms_fn, counts)


class OwnEstimateEverywhere(MedFlowSegTrainer_ownEstimate):
    """Every t > 0 sample on the own-estimate path (deep supervision on, as by default: the network returns a list,
    full resolution first)."""
    flow_overrides = {"own_estimate_fraction": 1.0}


def test_own_estimate_training_feeds_the_network_its_own_one_step_path(planned):
    trainer = make_trainer(planned, OwnEstimateEverywhere)
    assert trainer.flow_config.own_estimate_fraction == 1.0 and trainer.enable_deep_supervision
    batch, _ = real_batches(trainer)
    calls = []
    hook = trainer.network.register_forward_hook(
        lambda m, args, out: calls.append([a if a is None else a.detach().clone() for a in args] + [out[0].detach()]))
    priors, path = [], trainer.path
    trainer.path = SimpleNamespace(sample=lambda x0, x1, t: priors.append(x0) or path.sample(x0, x1, t))
    for seed in range(20):  # a draw with samples both at t = 0 and at t > 0
        calls.clear()
        torch.manual_seed(seed)
        losses = trainer._flow_loss(batch["data"].float(), [s.float() for s in batch["target"]])
        t = calls[-1][2]
        if 0 < int((t > 0).sum()) < t.numel():
            break
    hook.remove()
    assert torch.isfinite(losses["loss"])
    assert all(isinstance(c[3], torch.Tensor) and c[3].shape[0] == c[0].shape[0] for c in calls)  # full-res outputs
    (image_sub, x0_sub, t0, raw_sub), (image, x_t, t, _) = calls
    picked = torch.nonzero(t > 0).flatten()
    # the estimate ran on exactly the t > 0 rows at t = 0, prior-free (the field sees t · x_t: x_t=None; their
    # prior draw is the one the path got) ...
    assert torch.equal(t0, torch.zeros(picked.numel())) and torch.equal(image_sub, image[picked]) and x0_sub is None
    x0_sub = priors[-1][picked]
    # ... and the trained input lies on the line from that draw to the network's own estimate x̂1 = 2 softmax - 1
    tt = t[picked].reshape(-1, *[1] * (x_t.ndim - 1))
    expected = (1 - tt) * x0_sub + tt * (2 * torch.softmax(raw_sub.float(), 1) - 1)
    assert torch.allclose(x_t[picked], expected, atol=1e-5)
    torch.manual_seed(0)
    assert np.isfinite(trainer.train_step(batch)["loss"])
