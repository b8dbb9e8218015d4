"""DDP on the CPU with gloo: one step on 2 ranks equals one single-process step on the concatenated batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from medflowseg_nn.distributed import DistributedEnv, backend_for, process_group, torchrun_environment
from medflowseg_nn.flow.loss import FlowMatchingLoss
from medflowseg_nn.flow.path import LinearPath
from medflowseg_nn.flow.label_space import segmentation_to_target
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from tests.networks.test_vector_field_unet import tiny_kwargs

GLOBAL_BATCH, SPATIAL, CLASSES = 4, (16, 16), 3
TOLERANCE = 1e-6  # float32 sums in a different order (all-reduce, DDP's bucketed average)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(GLOBAL_BATCH, 1, *SPATIAL, generator=g)
    seg = torch.randint(0, CLASSES, (GLOBAL_BATCH, 1, *SPATIAL), generator=g)
    x0 = torch.randn(GLOBAL_BATCH, CLASSES, *SPATIAL, generator=g)
    t = torch.tensor([0.0, 0.3, 0.0, 0.8])
    return image, seg, x0, t


def one_step(net: torch.nn.Module, rows: slice, ddp: bool, paired: bool = False) -> None:
    """One SGD step on ``rows`` of the fixed batch; ``paired``: as ``MedFlowSegTrainer_pairedImages`` trains, two
    forwards (the second on the first's detached output) before one backward."""
    image, seg, x0, t = (a[rows] for a in fixed_batch())
    path = LinearPath().sample(x0, segmentation_to_target(seg, CLASSES), t)
    raw = net(image, path.x_t, t)
    if paired:
        second = net(image, 0.5 * x0 + 0.5 * torch.tanh(raw.detach()), torch.full_like(t, 0.5))
        raw, seg = torch.cat([raw, second]), torch.cat([seg, seg])
        path = LinearPath().sample(torch.cat([x0, x0]), torch.cat([path.x1, path.x1]), torch.cat([t, t]))
    loss = FlowMatchingLoss("x1", ddp=ddp)(raw, path, seg)["loss"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()


def make_net() -> VectorFieldUNet:
    torch.manual_seed(0)
    net = VectorFieldUNet(1, CLASSES, **tiny_kwargs(2))
    with torch.no_grad():  # zero-initialised branches would hide differences in their gradients
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def rank_main(rank: int, world: int, port: int, out: str, paired: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with process_group(torchrun_environment(), torch.device("cpu")):
        net = DistributedDataParallel(make_net())
        per_rank = GLOBAL_BATCH // world
        one_step(net, slice(rank * per_rank, (rank + 1) * per_rank), ddp=True, paired=paired)
        assert dist.get_backend() == "gloo"
        if rank == 0:
            torch.save(net.module.state_dict(), out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("paired", [False, True], ids=["one_forward", "two_forwards"])
def test_two_rank_step_equals_single_process_step_on_the_whole_batch(tmp_path, paired):
    out = str(tmp_path / "rank0.pth")
    mp.spawn(rank_main, args=(2, free_port(), out, paired), nprocs=2, join=True)
    ddp_params = torch.load(out)
    single = make_net()
    one_step(single, slice(0, GLOBAL_BATCH), ddp=False, paired=paired)
    start = make_net().state_dict()
    moved = 0
    for name, value in single.state_dict().items():
        assert torch.allclose(ddp_params[name], value, atol=TOLERANCE), name
        moved += int(not torch.equal(value, start[name]))
    assert moved > 10  # the step really changed the network


def test_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_environment() == DistributedEnv(3, 4, 1)
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda")) == "nccl"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_nccl_world_of_one(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with process_group(DistributedEnv(0, 1, 0), torch.device("cuda")) as device:
        assert dist.get_backend() == "nccl" and device.index == 0
