"""``mfs_train -pretrained_weights``: transfer from a plain nnU-Net checkpoint of the same plans (nnU-Net's own
``nnUNetTrainer`` trained a few iterations on the plans' ``PlainConvUNet`` copy) and from a MedFlowSeg one."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from medflowseg_nn.cli import train
from medflowseg_nn.errors import UserError
from medflowseg_nn.pretrained import load_pretrained_weights
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from tests.conftest import plan_synthetic_dataset, tiny_network_plans

CONFIG = "3d_fullres"
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NNUNET_ITERATIONS = 30


def shrunk(plans: dict, plain: bool = False) -> dict:
    plans = tiny_network_plans(plans, CONFIG)
    if plain:
        plans["configurations"][CONFIG]["architecture"]["network_class_name"] = PLAIN_UNET
    return plans


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A planned synthetic dataset and nnU-Net's trainer run for a few iterations on its PlainConvUNet copy."""
    root = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as mp:
        planned = plan_synthetic_dataset(root, mp, 985)
        plans, dataset_json = planned.plans, planned.dataset_json
        torch.manual_seed(0)
        np.random.seed(0)
        plain = nnUNetTrainer(shrunk(plans, plain=True), CONFIG, 0, dataset_json, device=torch.device("cpu"))
        plain.num_epochs, plain.num_iterations_per_epoch, plain.num_val_iterations_per_epoch = 1, NNUNET_ITERATIONS, 1
        plain.run_training()
        checkpoint = root / "nnunet_checkpoint.pth"
        plain.save_checkpoint(str(checkpoint))
        yield SimpleNamespace(root=root, plans=plans, dataset_json=dataset_json, checkpoint=checkpoint,
                              plain_network=plain.network)


def make_trainer(ns) -> MedFlowSegTrainer:
    trainer = MedFlowSegTrainer(shrunk(ns.plans), CONFIG, 0, ns.dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_the_field_starts_as_the_pretrained_segmenter(pretrained, caplog):
    trainer = make_trainer(pretrained)
    field = trainer.network
    with caplog.at_level(logging.INFO, logger="medflowseg_nn"):
        report = load_pretrained_weights(field, str(pretrained.checkpoint), pretrained.dataset_json["labels"], "x1")
    lines = [r.getMessage() for r in caplog.records if r.name == "medflowseg_nn.pretrained"]
    assert sum(line.startswith("pretrained weights ") and "copied" in line for line in lines) == 1
    assert sum("x_t channels set to zero" in line for line in lines) == 1
    assert sum(line.startswith("not in the checkpoint, kept at initialisation") for line in lines) == 1
    assert not report.skipped  # same plans and labels: heads, encoder, decoder all correspond
    assert {k.split(".")[0] for k in report.copied} == {"encoder", "decoder", "upsample", "seg_head", "aux_heads"}
    assert {k.split(".")[0] for k in report.kept} >= {"time_embed", "encoder_time", "decoder_time", "dbsa", "faa"}

    plain = pretrained.plain_network.eval()
    plain.decoder.deep_supervision = False
    first = field.encoder[0].convs[0].conv.weight
    assert torch.equal(first[:, :1], plain.encoder.stages[0][0].convs[0].conv.weight)
    assert not first[:, 1:].any()
    field.eval()
    image = torch.randn(2, 1, *trainer.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(2, 3, *image.shape[2:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(image)
        for t in (torch.zeros(2), torch.tensor([0.3, 0.9])):  # any x_t and t: the pretrained logits
            assert torch.allclose(field(image, x_t, t), expected, atol=1e-5)


def first_loss(trainer, batch: dict) -> float:
    trainer.network.train()
    torch.manual_seed(7)  # the same x0 and t for every network
    return float(trainer.train_step(copy.deepcopy(batch))["loss"])


def test_finetuning_starts_from_a_lower_loss_than_random_init(pretrained):
    torch.manual_seed(0)
    random_init = make_trainer(pretrained)
    torch.manual_seed(0)
    finetuned = make_trainer(pretrained)
    train.load_pretrained(finetuned, str(pretrained.checkpoint))
    loader, _ = random_init.get_dataloaders()
    batches = [next(loader) for _ in range(3)]
    random_losses = [first_loss(make_trainer(pretrained), b) for b in batches]
    finetuned_state = copy.deepcopy(finetuned.network.state_dict())
    tuned_losses = []
    for b in batches:  # each batch from the same pretrained start
        finetuned.network.load_state_dict(finetuned_state)
        tuned_losses.append(first_loss(finetuned, b))
    assert np.mean(tuned_losses) < np.mean(random_losses), (tuned_losses, random_losses)
    assert all(np.isfinite(tuned_losses))


def test_medflowseg_checkpoint_transfers_everything(pretrained, tmp_path):
    source = make_trainer(pretrained)
    with torch.no_grad():
        for p in source.network.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    source.output_folder = str(tmp_path)
    source.save_checkpoint(str(tmp_path / "mfs.pth"))
    target = make_trainer(pretrained)
    report = load_pretrained_weights(target.network, str(tmp_path / "mfs.pth"), pretrained.dataset_json["labels"],
                                     "x1")
    assert not report.skipped and not report.kept and not report.sliced
    for (k, a), b in zip(source.network.state_dict().items(), target.network.state_dict().values()):
        assert torch.equal(a, b), k


def test_refusals(pretrained, tmp_path, capsys):
    labels = pretrained.dataset_json["labels"]
    net = make_trainer(pretrained).network
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a torch checkpoint"):
        load_pretrained_weights(net, str(junk), labels, "x1")
    torch.save({"network_weights": {"other.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="nothing in the checkpoint matches"):
        load_pretrained_weights(net, str(tmp_path / "other.pth"), labels, "x1")
    other_labels = {**labels, "extra": 9}
    report = load_pretrained_weights(net, str(pretrained.checkpoint), other_labels, "x1")
    assert list(report.skipped) == ["segmentation heads: the checkpoint was trained on other labels"]
    assert train.main(["985", CONFIG, "0", "--c", "-pretrained_weights", str(pretrained.checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be combined with --c" in err[0]
