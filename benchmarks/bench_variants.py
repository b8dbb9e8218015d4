"""Parameter count and one-step inference time of the vector-field variants next to nnU-Net's PlainConvUNet.

One step = one network evaluation on a patch (batch 1, ``torch.inference_mode``; networks timed in
interleaved rounds, minimum reported, so that other load on the machine affects all alike), the cost of ``mfs_predict``
per sliding-window position without mirroring. Architecture keywords come from a plans file
(``nnUNet_preprocessed/DatasetXXX/MedFlowSegPlans.json``).

    python benchmarks/bench_variants.py --plans $nnUNet_preprocessed/Dataset004_Hippocampus/MedFlowSegPlans.json
"""
from __future__ import annotations

import argparse
import json
import pydoc
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

VARIANTS = {"full": {}, "noDBSA": {"dbsa_stages": []}, "noFAA": {"faa_stages": []},
            "neither": {"dbsa_stages": [], "faa_stages": []}}


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time every function once per round, ``repeats`` rounds (so load from other processes hits all alike);
    report min and median per function."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", required=True)
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/out/bench_variants.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet

    plans = json.loads(Path(args.plans).read_text())
    cfg = plans["configurations"][args.c]
    arch = dict(cfg["architecture"]["arch_kwargs"])
    for key in cfg["architecture"]["_kw_requires_import"]:
        if arch.get(key) is not None:
            arch[key] = pydoc.locate(arch[key])
    num_classes = len(json.loads((Path(args.plans).parent / "dataset.json").read_text())["labels"])
    patch = cfg["patch_size"]
    image = torch.randn(1, 1, *patch)
    x0 = torch.randn(1, num_classes, *patch)
    t0 = torch.zeros(1)
    nets: dict = {"nnU-Net PlainConvUNet": PlainConvUNet(input_channels=1, num_classes=num_classes,
                                                         deep_supervision=False, **arch).eval()}
    for name, kwargs in VARIANTS.items():
        nets[f"VectorFieldUNet {name}"] = VectorFieldUNet(1, num_classes, **arch, **kwargs).eval()
    calls = {name: (lambda n=net: n(image)) if name.startswith("nnU-Net") else (lambda n=net: n(image, x0, t0))
             for name, net in nets.items()}
    with torch.inference_mode():
        timing = interleaved_seconds(calls, args.repeats)
    base = timing["nnU-Net PlainConvUNet"]["min"]
    rows = [{"network": name, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
             "seconds_min": timing[name]["min"], "seconds_median": timing[name]["median"],
             "ratio_to_plain": timing[name]["min"] / base} for name, net in nets.items()]
    print(f"{args.c} patch {patch}, batch 1, {args.threads} threads, {args.repeats} interleaved rounds")
    print(f"{'network':<30}{'params (M)':>12}{'min (s)':>10}{'median (s)':>12}{'× plain':>9}")
    for r in rows:
        print(f"{r['network']:<30}{r['params_M']:>12.2f}{r['seconds_min']:>10.3f}{r['seconds_median']:>12.3f}"
              f"{r['ratio_to_plain']:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"plans": args.plans, "configuration": args.c, "patch": patch,
                                          "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
