"""Where the time goes: per-module wall time of VectorFieldUNet vs nnU-Net's PlainConvUNet on the same plans.

Forward (inference, ``torch.inference_mode``) or forward + backward (training) at batch ``-b`` on the plans'
patch size, freshly initialised weights. Per-module times come from forward pre/post hooks around the network's
top-level children (encoder stages, DBSA, FAA, time modulation, conditioning encoder, decoder, ...) so they add
up to the forward time; ``--torch_profiler`` adds torch.profiler's top operators.

    python benchmarks/profile_network.py -c 3d_fullres --mode inference -b 1 --iters 5
    python benchmarks/profile_network.py -c 3d_fullres --mode train --iters 3
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import time
from typing import Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.profile")


#: VectorFieldUNet variants: plans' network options (``use_dbsa`` ...) and extra constructor keywords ("last" =
#: the deepest skip for DBSA, the bottleneck for FAA); the ones not reachable from the plans show what a cheaper
#: default would cost. Since b0b21ae DBSA's default is the deepest skip, so "ours_dbsaLast" builds the same network
#: as "ours"; it is kept so that the commands in RESULTS.md from before that commit still run.
VARIANTS: dict[str, dict] = {
    "ours": {}, "ours_noDBSA": {"use_dbsa": False}, "ours_noFAA": {"use_faa": False},
    "ours_noAttention": {"use_dbsa": False, "use_faa": False},
    "ours_dil1": {"dbsa_dilations": (1,)}, "ours_dbsaLast": {"dbsa_stages": "last"},
    "ours_faaLast": {"faa_stages": "last"},
    "ours_lean": {"dbsa_dilations": (1,), "dbsa_stages": "last", "faa_stages": "last"},
}


def build_networks(name: str, configuration: str, variants: Sequence[str]) -> tuple[dict, list[int], int, int]:
    """PlainConvUNet ("plain", as nnUNetTrainer builds it) and VectorFieldUNet variants (as MedFlowSegTrainer's
    ``build_network_architecture`` builds them: plans' architecture keywords + the flow block's network options)."""
    import pydoc

    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.config import FlowMatchingConfig
    from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
    from medflowseg_nn.plugins import get_trainer_class

    plans, dataset_json = C.load_plans(name)
    nets = {}
    for v in variants:
        pm = PlansManager(C.plain_unet_plans(plans) if v == "plain" else plans)
        cm = pm.get_configuration(configuration)
        n_in = determine_num_input_channels(pm, cm, dataset_json)
        n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
        torch.manual_seed(0)
        if v == "plain":
            nets[v] = get_trainer_class("nnUNetTrainer").build_network_architecture(
                pm, cm, n_in, n_out, enable_deep_supervision=False)
            continue
        opts = dict(VARIANTS[v])
        plan_opts = {k: opts.pop(k) for k in ("use_dbsa", "use_faa") if k in opts}
        kwargs = dict(cm.network_arch_init_kwargs)
        for key in cm.network_arch_init_kwargs_req_import:
            if kwargs.get(key) is not None:
                kwargs[key] = pydoc.locate(kwargs[key])
        kwargs.update(FlowMatchingConfig.from_plans(plans).with_network(**plan_opts).network.network_kwargs())
        n_stages = kwargs["n_stages"]
        if opts.get("dbsa_stages") == "last":
            opts["dbsa_stages"] = [n_stages - 2]
        if opts.get("faa_stages") == "last":
            opts["faa_stages"] = [n_stages - 1]
        kwargs.update(opts)
        nets[v] = VectorFieldUNet(n_in, n_out, **kwargs)
    cfg = plans["configurations"][configuration]
    return nets, cfg["patch_size"], n_in, n_out


def add_timing_hooks(net, times: dict, detail: bool = False) -> None:
    """Wall time per top-level part (summing to the forward); with ``detail`` also the children of each DBSA /
    FAA block, listed under the block's name (nested, so those lines add up to less than the block)."""
    start: dict = {}

    def pre(name):
        def f(_m, _i):
            start[name] = time.perf_counter()
        return f

    def post(name):
        def f(_m, _i, _o):
            times[name] += time.perf_counter() - start.pop(name)
        return f

    from torch import nn
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)

    seen: set = set()

    def targets(name: str, module, depth: int):
        # expand containers, and PlainConvUNet's encoder/decoder objects, down to stage level; each module once
        # (PlainConvUNet's decoder holds a reference to the encoder)
        if id(module) in seen:
            return
        seen.add(id(module))
        if depth < 3 and (isinstance(module, containers) or name in ("encoder", "decoder")):
            for n, m in module.named_children():
                yield from targets(f"{name}.{n}", m, depth + 1)
        else:
            yield name, module
            if detail and name.split(".")[0] in ("dbsa", "faa"):
                for n, m in module.named_children():
                    kids = list(m.named_children()) if isinstance(m, containers) and depth < 4 else [("", m)]
                    for k, mm in kids:
                        yield f"{name}.{n}{'.' + k if k else ''}", mm

    for top_name, top in net.named_children():
        for name, m in targets(top_name, top, 0):
            m.register_forward_pre_hook(pre(name))
            m.register_forward_hook(post(name))


def make_step(net, kind: str, patch: list[int], batch: int, n_in: int, n_out: int, mode: str):
    import torch
    x = torch.randn(batch, n_in, *patch)
    xt = torch.randn(batch, n_out, *patch)
    t = torch.zeros(batch)
    net.train(mode == "train")

    def step() -> None:
        if mode == "inference":
            with torch.inference_mode():
                net(x) if kind == "plain" else net(x, xt, t)
        else:
            net.zero_grad(set_to_none=True)
            out = net(x) if kind == "plain" else net(x, xt, t)
            (out[0] if isinstance(out, (list, tuple)) else out).float().mean().backward()
    return step


def run_interleaved(nets: dict, patch: list[int], batch: int, n_in: int, n_out: int, mode: str, iters: int,
                    hooks: bool, profiler: bool, detail: bool = False) -> dict:
    """Round-robin over the variants, ``iters`` rounds after one warm-up round: load from other processes on a
    shared machine hits every variant alike. Wall and process CPU seconds per step."""
    import torch
    steps, times, warmup = {}, {}, {}
    for v, net in nets.items():
        times[v] = collections.defaultdict(float)
        if hooks:
            add_timing_hooks(net, times[v], detail)
        steps[v] = make_step(net, "plain" if v == "plain" else "ours", patch, batch, n_in, n_out, mode)
        w0 = time.perf_counter()
        steps[v]()  # warm-up (first call: allocations, oneDNN primitive creation)
        warmup[v] = time.perf_counter() - w0
        times[v].clear()
    wall = {v: [] for v in nets}
    cpu = {v: [] for v in nets}
    for _ in range(iters):
        for v in nets:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            wall[v].append(time.perf_counter() - w0)
            cpu[v].append(time.process_time() - c0)
    res = {}
    for v in nets:
        res[v] = {"median_s": statistics.median(wall[v]), "all_s": wall[v], "warmup_s": warmup[v],
                  "median_cpu_s": statistics.median(cpu[v]),
                  "modules_s_per_iter": {k: s / iters for k, s in sorted(times[v].items(), key=lambda kv: -kv[1])}}
        if profiler:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[v]()
            res[v]["top_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--mode", choices=("inference", "train"), default="inference")
    p.add_argument("-b", "--batch", type=int, default=None, help="default: 1 for inference, plans' batch for train")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["plain", "ours", "ours_noAttention"],
                   choices=("plain", *VARIANTS))
    p.add_argument("--no_hooks", action="store_true", help="totals only (hooks add a little overhead)")
    p.add_argument("--torch_profiler", action="store_true")
    p.add_argument("--detail", action="store_true", help="also time the children of DBSA / FAA blocks")
    p.add_argument("--top", type=int, default=16, help="module lines printed per variant")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all cores)")
    C.add_output_args(p, "profile_network.json", verbose=False)
    args = p.parse_args(argv)
    C.setup_logging()
    C.setup_env(args.work)
    import torch
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    info = C.machine_info()
    name = C.resolve_dataset_name(args.d)
    C.ensure_planned(name, [args.configuration], preprocess=False)
    nets, patch, n_in, n_out = build_networks(name, args.configuration, args.variants)
    plans, _ = C.load_plans(name)
    batch = args.batch or (1 if args.mode == "inference" else plans["configurations"][args.configuration]["batch_size"])
    results = run_interleaved(nets, patch, batch, n_in, n_out, args.mode, args.iters, not args.no_hooks,
                              args.torch_profiler, args.detail)
    ref = results[args.variants[0]]
    for v in args.variants:
        r = results[v]
        print(f"\n## {v}: {args.mode} batch {batch} patch {patch}: median {r['median_s']:.3f} s wall "
              f"({r['median_s'] / ref['median_s']:.2f}x {args.variants[0]}), {r['median_cpu_s']:.3f} s CPU "
              f"({r['median_cpu_s'] / ref['median_cpu_s']:.2f}x); first (warm-up) call {r['warmup_s']:.2f} s")
        for k, s in list(r["modules_s_per_iter"].items())[:args.top]:
            print(f"  {k:28s} {s:8.3f} s")
        if "top_ops" in r:
            print(r["top_ops"])
    C.write_json(args.out, {"benchmark": "profile_network", "machine": info, "args": vars(args) |
                            {"work": str(args.work), "out": str(args.out)}, "batch": batch, "patch": patch,
                            "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
