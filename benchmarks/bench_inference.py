"""Inference wall time: MedFlowSeg one-step vs 50 Euler steps (same network) vs nnU-Net's own predictor.

All three use the same plans (MedFlowSegPlans: spacing, normalisation, patch size), the same sliding window
(step 0.5, Gaussian weighting) and the same mirroring setting. nnU-Net's predictor runs ``nnUNetTrainer``'s
``PlainConvUNet`` built from a copy of our plans with the network class switched (see
``common.plain_unet_plans``). Weights are freshly initialised (seed 0) unless ``--ours_checkpoint`` /
``--nnunet_checkpoint`` are given: wall time does not depend on weight values.

Per case, in the main process: nnU-Net's preprocessing (once, shared), then for each method
``predict_logits_from_preprocessed_data`` (sliding window + TTA + network = "network s") and
``convert_predicted_logits_to_segmentation_with_correct_shape`` (resampling + argmax = "export s"). Writing
files is left out (identical for all methods). Methods run in rotating order per case, so load from other
processes on a shared machine hits all of them alike; the ratios come from the same run: summed wall time,
the median of per-case wall ratios, and summed process CPU time (less sensitive to other processes' load).

    python benchmarks/bench_inference.py --num_cases 10 --tta off --multistep_cases 2
    python benchmarks/bench_inference.py --num_cases 10 --tta on
    python benchmarks/bench_inference.py --datasets 4 140     # + Dataset140_LeftAtrium: 2 cases, TTA off
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.inference")
METHODS = ("nnunet", "ours_1step", "ours_50step")


def build_predictors(plans: dict, dataset_json: dict, configuration: str, tta: bool, multi_steps: int,
                     ours_ckpt: Optional[str], nnunet_ckpt: Optional[str]) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    from medflowseg_nn.plugins import get_trainer_class

    device = torch.device("cpu")
    out = {}
    for kind, plans_dict, trainer_name, ckpt in (("ours", plans, "MedFlowSegTrainer", ours_ckpt),
                                                 ("nnunet", C.plain_unet_plans(plans), "nnUNetTrainer",
                                                  nnunet_ckpt)):
        pm = PlansManager(plans_dict)
        cm = pm.get_configuration(configuration)
        n_in = determine_num_input_channels(pm, cm, dataset_json)
        n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
        torch.manual_seed(0)
        net = get_trainer_class(trainer_name).build_network_architecture(pm, cm, n_in, n_out,
                                                                         enable_deep_supervision=False)
        weights = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"] if ckpt \
            else net.state_dict()
        axes = tuple(range(len(cm.patch_size)))
        common = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False,
                      device=device, verbose=False, allow_tqdm=False)
        if kind == "nnunet":
            p = nnUNetPredictor(**common)
            p.manual_initialization(net, pm, cm, [weights], dataset_json, trainer_name, axes)
            out["nnunet"] = p
        else:
            for name, steps in (("ours_1step", 1), ("ours_50step", multi_steps)):
                p = MedFlowSegPredictor(**common, steps=steps, solver="euler")
                p.manual_initialization(net, pm, cm, [weights], dataset_json, trainer_name, axes)
                out[name] = p
    return out


def preprocess(predictor, files: list[str]):
    """nnU-Net's preprocessing of one case as its predictor does it → (tensor, properties, seconds)."""
    import torch
    t0 = time.perf_counter()
    pp = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pp.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                 predictor.dataset_json)
    return torch.from_numpy(data), props, time.perf_counter() - t0


def time_method(predictor, data, props) -> tuple[float, float, float]:
    """(network wall s, network process-CPU s, export wall s) for one preprocessed case."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    t0, c0 = time.perf_counter(), time.process_time()
    logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
    t1, c1 = time.perf_counter(), time.process_time()
    convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props)
    return t1 - t0, c1 - c0, time.perf_counter() - t1


def run_dataset(name: str, configuration: str, num_cases: int, tta_settings: Sequence[bool],
                multistep_cases: dict, multi_steps: int, args: argparse.Namespace) -> dict:
    """``multistep_cases``: {tta: how many of the cases also run the multi-step baseline}."""
    C.ensure_planned(name, [configuration], preprocess=False)
    plans, dataset_json = C.load_plans(name)
    cases = C.case_ids(name)[:num_cases]
    n_ch = len(dataset_json["channel_names"])
    raw = C.shared_data_dir() / name / "imagesTr"
    ending = dataset_json["file_ending"]
    cfg = plans["configurations"][configuration]
    result = {"dataset": name, "configuration": configuration, "patch_size": cfg["patch_size"],
              "spacing": cfg["spacing"], "cases": cases, "per_case": [], "summary": []}
    prepped = None
    for tta in tta_settings:
        predictors = build_predictors(plans, dataset_json, configuration, tta, multi_steps, args.ours_checkpoint,
                                      args.nnunet_checkpoint)
        if prepped is None:
            prepped = [preprocess(predictors["nnunet"], [str(raw / f"{c}_{i:04d}{ending}") for i in range(n_ch)])
                       for c in cases]
            result["shapes"] = [list(d.shape[1:]) for d, _, _ in prepped]
        k_multi = multistep_cases[tta]
        methods = [m for m in METHODS if m != "ours_50step" or k_multi > 0]
        # warm-up on one tile (allocator, oneDNN primitives, Gaussian cache): not timed
        tile = prepped[0][0][(slice(None), *[slice(0, p) for p in cfg["patch_size"]])]
        for m in ("nnunet", "ours_1step"):
            predictors[m].predict_sliding_window_return_logits(tile)
        for i, (case, (data, props, t_pre)) in enumerate(zip(cases, prepped)):
            order = methods[i % len(methods):] + methods[: i % len(methods)]
            for m in order:
                if m == "ours_50step" and i >= k_multi:
                    continue
                t_net, c_net, t_exp = time_method(predictors[m], data, props)
                rec = {"tta": tta, "case": case, "method": m, "network_s": t_net, "network_cpu_s": c_net,
                       "export_s": t_exp, "preprocess_s": t_pre}
                result["per_case"].append(rec)
                logger.info("%s tta=%s %s %s: network %.2f s, export %.2f s", name, tta, case, m, t_net, t_exp)
        result["summary"] += summarize(name, tta, result["per_case"])
    return result


def summarize(name: str, tta: bool, per_case: list[dict]) -> list[dict]:
    """One row per method: totals over its cases; ratios against nnU-Net / one step over the SAME cases."""
    recs = [r for r in per_case if r["tta"] == tta]
    by = {m: {r["case"]: r for r in recs if r["method"] == m} for m in METHODS}

    def net(method: str, cases: Sequence[str], key: str = "network_s") -> float:
        return sum(by[method][c][key] for c in cases)

    def median_ratio(method: str, ref: str, cases: Sequence[str]) -> float:
        return statistics.median(by[method][c]["network_s"] / by[ref][c]["network_s"] for c in cases)

    def e2e(method: str, cases: Sequence[str]) -> float:
        return sum(by[method][c]["network_s"] + by[method][c]["export_s"] + by[method][c]["preprocess_s"]
                   for c in cases)

    rows = []
    for m in METHODS:
        cases = list(by[m])
        if not cases:
            continue
        row = {"dataset": name, "tta": "on" if tta else "off", "method": m, "cases": len(cases),
               "network_s": net(m, cases), "network_s_per_case": net(m, cases) / len(cases),
               "e2e_s": e2e(m, cases), "e2e_s_per_case": e2e(m, cases) / len(cases)}
        if m != "nnunet":
            row["network_vs_nnunet"] = net(m, cases) / net("nnunet", cases)
            row["median_case_vs_nnunet"] = median_ratio(m, "nnunet", cases)
            row["cpu_vs_nnunet"] = net(m, cases, "network_cpu_s") / net("nnunet", cases, "network_cpu_s")
            row["e2e_vs_nnunet"] = e2e(m, cases) / e2e("nnunet", cases)
        if m == "ours_50step":
            row["network_vs_1step"] = net(m, cases) / net("ours_1step", cases)
            row["cpu_vs_1step"] = net(m, cases, "network_cpu_s") / net("ours_1step", cases, "network_cpu_s")
            row["e2e_vs_1step"] = e2e(m, cases) / e2e("ours_1step", cases)
        rows.append(row)
    return rows


COLUMNS = ("dataset", "tta", "method", "cases", "network_s", "network_s_per_case", "e2e_s", "network_vs_nnunet",
           "median_case_vs_nnunet", "cpu_vs_nnunet", "e2e_vs_nnunet", "network_vs_1step", "cpu_vs_1step")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["4"],
                   help="dataset ids/names; the first gets --num_cases and --tta, the others (large volumes) "
                        "--num_cases_large with TTA off and --multistep_cases_large (default: 4)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--num_cases", type=int, default=10)
    p.add_argument("--tta", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument("--steps", type=int, default=50, help="steps of the multi-step baseline (default 50)")
    p.add_argument("--multistep_cases", type=int, default=2,
                   help="with TTA off, the first K cases also run with --steps Euler steps; 0 = skip (default 2)")
    p.add_argument("--multistep_cases_tta", type=int, default=0,
                   help="the same with TTA on (8x the cost: 50 steps x 8 mirrors per patch; default 0)")
    p.add_argument("--num_cases_large", type=int, default=2)
    p.add_argument("--multistep_cases_large", type=int, default=0)
    p.add_argument("--ours_checkpoint", default=None, help="checkpoint .pth (default: fresh init)")
    p.add_argument("--nnunet_checkpoint", default=None, help="checkpoint .pth (default: fresh init)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all cores)")
    C.add_output_args(p, "bench_inference.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    C.setup_env(args.work)
    import torch
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    info = C.machine_info()
    results = []
    for k, d in enumerate(args.datasets):
        name = C.resolve_dataset_name(d)
        if k == 0:
            results.append(run_dataset(name, args.configuration, args.num_cases, [t == "on" for t in args.tta],
                                       {False: args.multistep_cases, True: args.multistep_cases_tta}, args.steps,
                                       args))
        else:
            results.append(run_dataset(name, args.configuration, args.num_cases_large, [False],
                                       {False: args.multistep_cases_large}, args.steps, args))
    rows = [r for res in results for r in res["summary"]]
    weights = "checkpoints" if args.ours_checkpoint or args.nnunet_checkpoint else "fresh init (seed 0)"
    table = C.markdown_table(rows, COLUMNS)
    print(f"\nweights: {weights}; times in seconds, summed over cases; ratios over the same cases\n{table}")
    C.write_json(args.out, {"benchmark": "inference", "machine": info, "args": {k: str(v) for k, v in
                                                                                 vars(args).items()},
                            "weights": weights, "results": results, "summary": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
