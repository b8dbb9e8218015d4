"""Is the planner's VRAM estimate of VectorFieldUNet safe? Estimate vs. measured activation memory, per plan.

nnU-Net's planner picks patch and batch size by comparing ``static_estimate_VRAM_usage`` with reference values
calibrated on PlainConvUNet. In nnunetv2 2.8.1 ``ExperimentPlanner.static_estimate_VRAM_usage`` builds the
network named in the plans (``get_network_from_plans``, deep supervision off) and returns only
``net.compute_conv_feature_map_size(patch_size)``: activation elements at batch 1; ``input_channels`` is used to
build the network but the input tensor itself is not counted. ``MedFlowSegPlanner`` calls it on VectorFieldUNet
(with the flow block's network options) and adds the input tensor, ``prod([image + x_t channels, *patch])``.
Our estimate is therefore as safe as nnU-Net's iff measured / estimate for VectorFieldUNet is not larger than
measured / estimate for PlainConvUNet on the same plans (column ``vs plain``, ≤ 1 = at least as conservative).

Measured: the storages autograd saves for backward during one training forward at batch 1 on the plans' patch
(``medflowseg_nn.profiling.memory``: saved-tensor hooks, each storage once, parameters left out; fp32 on CPU;
random image, x_t and t), followed by a backward; and, noisier, the RSS increase of one more forward + backward
(peak reset through ``/proc/self/clear_refs``, heap trimmed first). Networks as ``profile_network.build_networks``
builds them (PlainConvUNet as nnUNetTrainer builds it, without deep supervision; ours as
``MedFlowSegTrainer.build_network_architecture`` does, checked here).

    python benchmarks/bench_memory.py -d 4 140 -c 2d 3d_fullres
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from profile_network import build_networks  # noqa: E402

logger = logging.getLogger("benchmarks.memory")
NETWORKS = ("plain", "ours")
COLUMNS = ("dataset", "configuration", "network", "patch", "plans batch", "params (M)", "estimate (M el)",
           "saved (M el)", "saved (MB fp32)", "saved/estimate", "vs plain", "step RSS +MB")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS starts low
    except (OSError, AttributeError):
        pass


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def step_rss_increase_mb(step: Callable[[], None]) -> tuple[float, str]:
    """Peak RSS during ``step`` minus RSS before it, and how the peak was read."""
    _trim_heap()
    before = C.current_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    peak_before = C.peak_rss_mb()
    step()
    if method == "ru_maxrss":  # process-lifetime peak: only visible if this step set a new one
        peak = C.peak_rss_mb()
        return (peak - before if peak > peak_before else float("nan")), method
    return _status_mb("VmHWM") - before, method


def check_ours_matches_trainer(name: str, configuration: str, net: Any, n_in: int, n_out: int) -> None:
    """build_networks' "ours" must be MedFlowSegTrainer.build_network_architecture's network."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    pm = PlansManager(C.load_plans(name)[0])
    ref = MedFlowSegTrainer.build_network_architecture(pm, pm.get_configuration(configuration), n_in, n_out)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in ref.state_dict().items()} or type(ref) is not type(net):
        raise RuntimeError(f"{name} {configuration}: build_networks('ours') differs from MedFlowSegTrainer's")


def planner_estimates(name: str, configuration: str, nets: dict, patch: list[int], n_in: int,
                      n_out: int) -> dict[str, int]:
    """Both estimates as nnU-Net's planner computes them, cross-checked against the built networks."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.config import FlowMatchingConfig
    from medflowseg_nn.planners.mfs_planner import MedFlowSegPlanner
    plans, dataset_json = C.load_plans(name)
    cm = PlansManager(plans).get_configuration(configuration)
    n_labels = len(dataset_json["labels"])  # what the planner passes as output_channels
    args = (cm.network_arch_init_kwargs, tuple(cm.network_arch_init_kwargs_req_import))
    planner = MedFlowSegPlanner(name, flow_config=FlowMatchingConfig.from_plans(plans))
    est = {"ours": int(planner.static_estimate_VRAM_usage(tuple(patch), n_in, n_labels,
                                                          cm.network_arch_class_name, *args)),
           "plain": int(ExperimentPlanner.static_estimate_VRAM_usage(tuple(patch), n_in, n_labels, C.PLAIN_UNET,
                                                                      *args))}
    check = {"ours": int(nets["ours"].compute_conv_feature_map_size(patch)) + math.prod([n_in + n_out, *patch]),
             "plain": int(nets["plain"].compute_conv_feature_map_size(patch))}
    if check != est:
        logger.warning("%s %s: planner estimate %s != network's own %s", name, configuration, est, check)
    return est


def measure(net: Any, kind: str, patch: list[int], n_in: int, n_out: int) -> dict[str, Any]:
    import torch

    from medflowseg_nn.profiling.memory import measure_saved_for_backward
    torch.manual_seed(0)
    image = torch.randn(1, n_in, *patch)
    inputs = (image,) if kind == "plain" else (image, torch.randn(1, n_out, *patch), torch.rand(1))
    t0 = time.perf_counter()
    stats = measure_saved_for_backward(net, inputs)  # forward counted, backward run
    hooked_s = time.perf_counter() - t0
    net.train()

    def step() -> None:
        out = net(*inputs)
        (out[0] if isinstance(out, (list, tuple)) else out).float().mean().backward()
        del out
        net.zero_grad(set_to_none=True)

    rss, method = step_rss_increase_mb(step)
    return {"saved_elements": stats.elements, "saved_bytes": stats.bytes, "saved_tensors": stats.n_saved,
            "saved_storages": stats.n_storages, "saved_bytes_by_dtype": stats.bytes_by_dtype,
            "saved_param_bytes": stats.param_bytes, "step_rss_increase_mb": rss, "rss_method": method,
            "hooked_step_s": hooked_s, "params": sum(p.numel() for p in net.parameters())}


def run_one(name: str, configuration: str) -> tuple[list[dict], str]:
    nets, patch, n_in, n_out = build_networks(name, configuration, list(NETWORKS))
    check_ours_matches_trainer(name, configuration, nets["ours"], n_in, n_out)
    est = planner_estimates(name, configuration, nets, patch, n_in, n_out)
    batch = int(C.load_plans(name)[0]["configurations"][configuration]["batch_size"])
    res = {}
    for kind in NETWORKS:
        logger.info("%s %s %s: patch %s, measuring", name, configuration, kind, patch)
        res[kind] = measure(nets[kind], kind, patch, n_in, n_out) | {"estimate_elements": est[kind]}
        res[kind]["ratio"] = res[kind]["saved_elements"] / est[kind]
    del nets
    _trim_heap()
    rows = []
    for kind in NETWORKS:
        r = res[kind]
        rows.append({"dataset": name, "configuration": configuration, "network": kind,
                     "patch": "x".join(map(str, patch)), "plans batch": batch, "params (M)": r["params"] / 1e6,
                     "estimate (M el)": est[kind] / 1e6, "saved (M el)": r["saved_elements"] / 1e6,
                     "saved (MB fp32)": r["saved_bytes"] / 2 ** 20, "saved/estimate": r["ratio"],
                     "vs plain": r["ratio"] / res["plain"]["ratio"], "step RSS +MB": r["step_rss_increase_mb"],
                     "raw": r})
    ours_mb, plain_mb = (batch * res[k]["saved_bytes"] / 2 ** 20 for k in ("ours", "plain"))
    line = (f"{name} {configuration}: batch {batch} x saved activations (fp32) = ours {ours_mb:.0f} MB vs "
            f"plain {plain_mb:.0f} MB ({ours_mb / plain_mb:.2f}x); batch x estimate = ours "
            f"{batch * est['ours'] / 1e6:.0f} M vs plain {batch * est['plain'] / 1e6:.0f} M elements")
    return rows, line


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", default=["4", "140"], help="dataset ids or names")
    p.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    C.add_output_args(p, "bench_memory.json")
    args = p.parse_args(argv)
    C.setup_logging(args.verbose)
    C.setup_env(args.work)
    import torch
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    import medflowseg_nn.planners.mfs_planner  # noqa: F401 - import the code measured now, so machine_info's git state is its
    import medflowseg_nn.trainers.mfs_trainer  # noqa: F401
    info = C.machine_info()
    rows, lines = [], []
    for d in args.datasets:
        name = C.resolve_dataset_name(d)
        C.ensure_planned(name, args.configurations, preprocess=False)
        for cfg in args.configurations:
            r, line = run_one(name, cfg)
            rows += r
            lines.append(line)
    print(C.markdown_table(rows, COLUMNS))
    print()
    print("\n".join(lines))
    C.write_json(args.out, {"benchmark": "bench_memory", "machine": info, "args": vars(args) |
                            {"work": str(args.work), "out": str(args.out)}, "rows": rows, "summary": lines})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
