"""Micro-batches of the CPU training step (``medflowseg_nn.trainers.micro_batches`` and ``train_step``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medflowseg_nn.trainers.micro_batches import accumulate_gradients, micro_batch_slices, rows_of, rows_within
from medflowseg_nn.trainers.paired_images import MedFlowSegTrainer_pairedImages
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_noDeepSupervision, MedFlowSegTrainer_wholeBatch
from tests.trainers.test_train_and_validation_step import make_trainer, planned, real_batches  # noqa: F401


@pytest.mark.parametrize("batch, max_rows, sizes", [(277, 234, [139, 138]), (277, 117, [93, 92, 92]),
                                                    (7, 2, [2, 2, 2, 1]), (5, 5, [5]), (5, 9, [5]),
                                                    (3, 1, [1, 1, 1])])
def test_slices_cover_the_batch_in_order_with_sizes_differing_by_at_most_one(batch, max_rows, sizes):
    slices = micro_batch_slices(batch, max_rows)
    assert [s.stop - s.start for s in slices] == sizes
    assert slices[0].start == 0 and slices[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(slices[:-1], slices[1:]))


@pytest.mark.parametrize("batch, max_rows", [(0, 2), (4, 0)])
def test_slices_refuse_empty_batches_and_chunks(batch, max_rows):
    with pytest.raises(ValueError, match="positive"):
        micro_batch_slices(batch, max_rows)


def test_rows_within_the_budget_of_the_full_resolution_decoder_map():
    # 2d Hippocampus plans: 32 features, patch 56 x 40 -> 2 * 32 * 2240 * 4 bytes = 573 440 bytes per row
    assert rows_within(64.0, [32, 64, 128, 256], [56, 40], 277) == 64 * 2 ** 20 // 573440 == 117
    assert rows_within(64.0, 32, [56, 40], 277, network_rows_per_row=2) == 58  # every image trained twice
    assert rows_within(64.0, 32, [40, 56, 40], 7) == 2  # 3d_fullres: 22.9 MB per row
    assert rows_within(None, 32, [40, 56, 40], 7) == 7  # no budget: the whole batch
    assert rows_within(64.0, 32, [40, 56, 40], 1) == 1
    assert rows_within(1e-6, 32, [40, 56, 40], 7) == 1  # never below one row


def test_rows_of_tensors_and_deep_supervision_lists():
    x = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(rows_of(x, slice(1, 3)), x[1:3])
    ds = rows_of([x, x[:, :1]], slice(2, 4))
    assert torch.equal(ds[0], x[2:]) and torch.equal(ds[1], x[2:, :1])


@pytest.mark.parametrize("max_rows", [1, 2, 3, 5])
def test_accumulated_gradients_equal_the_whole_batch_for_a_per_row_loss(max_rows):
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(3, 2), torch.randn(5, 3), torch.randn(5, 2)
    ((model(x) - y) ** 2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunks = []
    loss = accumulate_gradients(5, max_rows, lambda r: chunks.append(r) or ((model(x[r]) - y[r]) ** 2).mean())
    assert chunks == micro_batch_slices(5, max_rows)
    assert loss.item() == pytest.approx(((model(x) - y) ** 2).mean().item(), rel=1e-6)
    assert not loss.requires_grad
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_the_trainer_splits_on_the_cpu_only_and_the_variant_never(planned):
    trainer = make_trainer(planned, MedFlowSegTrainer_noDeepSupervision)
    plans_batch = trainer.configuration_manager.batch_size
    trainer.cpu_micro_batch_mib = 1e-6
    assert trainer.micro_batch_rows(plans_batch) == 1
    trainer.device = torch.device("cuda")  # only read here, nothing runs on it
    assert trainer.micro_batch_rows(plans_batch) == plans_batch
    trainer.device, trainer.is_ddp = torch.device("cpu"), True  # ranks' batches may differ: one chunk each
    assert trainer.micro_batch_rows(plans_batch) == plans_batch
    whole = make_trainer(planned, MedFlowSegTrainer_wholeBatch)
    assert whole.cpu_micro_batch_mib is None and whole.micro_batch_rows(plans_batch) == plans_batch
    paired = make_trainer(planned, MedFlowSegTrainer_pairedImages)
    assert paired.network_rows_per_image == 2


def test_train_step_in_one_row_chunks_returns_the_mean_of_their_losses(planned):
    trainer = make_trainer(planned, MedFlowSegTrainer_noDeepSupervision)
    trainer.cpu_micro_batch_mib = 1e-6  # one row per micro-batch
    batch, _ = real_batches(trainer)
    image, target = batch["data"], batch["target"]
    n = image.shape[0]
    assert n >= 2
    torch.manual_seed(7)  # each chunk draws its x0 and t in turn, as these calls do
    with torch.no_grad():
        expected = np.mean([trainer._flow_loss(image[i:i + 1], target[i:i + 1])["loss"].item() for i in range(n)])
    calls = []
    hook = trainer.network.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(7)
    loss = trainer.train_step(batch)["loss"]
    hook.remove()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert sum(calls) == n  # one forward with gradient per row (own-estimate passes run without)
