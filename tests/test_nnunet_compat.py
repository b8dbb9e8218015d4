"""Every nnU-Net internal that MedFlowSeg-nn relies on (medflowseg_nn.nnunet_compat), checked against the installed
nnunetv2: a release that moves or renames one fails here, not at the end of a training run."""
from __future__ import annotations

import multiprocessing
import os

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from torch import nn

from medflowseg_nn import nnunet_compat


def test_private_predictor_methods_exist():
    for name in nnunet_compat.PRIVATE_PREDICTOR_METHODS:
        assert callable(getattr(nnUNetPredictor, name, None)), f"nnUNetPredictor.{name} is gone"


def test_trainer_validation_looks_the_predictor_up_in_its_module():
    assert getattr(trainer_module, nnunet_compat.TRAINER_PREDICTOR_NAME) is nnUNetPredictor
    code = trainer_module.nnUNetTrainer.perform_actual_validation.__code__
    assert nnunet_compat.TRAINER_PREDICTOR_NAME in code.co_names, "perform_actual_validation no longer uses it"

    class Marker(nnUNetPredictor):
        pass

    with nnunet_compat.validation_predictor(Marker):
        assert trainer_module.nnUNetPredictor is Marker
    assert trainer_module.nnUNetPredictor is nnUNetPredictor


class FlipRecorder(nn.Module):
    """Returns its input and records which flip of the reference patch it was called with."""

    def __init__(self, reference: torch.Tensor):
        super().__init__()
        self.reference, self.calls = reference, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(2, x.ndim)]
        import itertools
        for n in range(len(dims) + 1):
            for c in itertools.combinations(dims, n):
                if torch.equal(x, torch.flip(self.reference, c) if c else self.reference):
                    self.calls.append(c)
                    return x
        raise AssertionError("unexpected input")


def test_mirror_order_is_nnunets():
    x = torch.randn(1, 1, 4, 5, 6)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.network, predictor.use_mirroring, predictor.allowed_mirroring_axes = FlipRecorder(x), True, (0, 1, 2)
    out = predictor._internal_maybe_mirror_and_predict(x)
    assert predictor.network.calls == nnunet_compat.mirror_combinations((0, 1, 2))
    assert torch.allclose(out, x)  # every call flipped back and averaged
    assert nnunet_compat.mirror_combinations(None) == [()]


def test_gaussian_is_nnunets_float16_map():
    g = nnunet_compat.gaussian_importance_map((8, 10), torch.device("cpu"))
    assert g.dtype == torch.float16 and g.shape == (8, 10) and float(g.max()) == 10


def test_pool_workers_are_visible():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        workers = nnunet_compat.pool_workers(pool)
        assert len(workers) == 1 and all(w.is_alive() for w in workers)


def test_zero_da_threads_is_presented_as_one(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    with nnunet_compat.nonzero_da_threads():
        assert os.environ["nnUNet_n_proc_DA"] == "1"
    assert os.environ["nnUNet_n_proc_DA"] == "0"


def test_trainer_module_wraps_with_a_ddp_name_we_can_adapt_for_cpu():
    from torch.nn.parallel import DistributedDataParallel

    assert getattr(trainer_module, nnunet_compat.TRAINER_DDP_NAME) is DistributedDataParallel
    assert nnunet_compat.TRAINER_DDP_NAME in trainer_module.nnUNetTrainer.initialize.__code__.co_names
    with nnunet_compat.cpu_capable_ddp():
        assert getattr(trainer_module, nnunet_compat.TRAINER_DDP_NAME) is not DistributedDataParallel
    assert getattr(trainer_module, nnunet_compat.TRAINER_DDP_NAME) is DistributedDataParallel
