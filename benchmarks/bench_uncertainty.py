"""Is the uncertainty informative? Error rate per uncertainty decile, and Dice / cost for K = 1, 4, 8 samples.

A trained model folder (``plans.json``, ``dataset.json``, ``fold_F/CHECKPOINT``) predicts the validation cases of
fold F (from nnU-Net's ``splits_final.json``; default ``$nnUNet_preprocessed/<dataset>/splits_final.json``) from
the raw images in ``common.shared_data_dir()/<dataset>/imagesTr``. Per K there is one ``MedFlowSegPredictor``
(``num_samples=K``, priors seeded ``--seed``, ``--seed + 1``, ...; sample disagreement recorded for K >= 2). Cases
are preprocessed once; the K predictors run case by case, interleaved, so machine load hits all K alike. Only
``predict_logits_from_preprocessed_data`` is timed (wall and process CPU time, after one untimed warm-up call
per K; for K >= 2 it includes recording the samples for the disagreement map). The averaged probabilities
(exported with nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``) and the disagreement
map (``uncertainty.revert_to_original_geometry``) are brought back to the raw image geometry, so they align
voxel by voxel with the raw label. The predicted label is the argmax of the averaged probabilities.

Table A, per K: mean Dice over cases per foreground class (``evaluation.dice``; 1.0 when reference and
prediction are both empty) and their mean, seconds per case, time relative to K = 1 (and that ratio / K: <= 1
means K samples cost at most K one-sample runs).

Table B, per K and map (predictive entropy of the averaged probabilities, also for K = 1; sample disagreement
for K >= 2): all voxels of all cases are pooled, sorted by uncertainty and split into 10 deciles of equal count
(D1 lowest ... D10 highest; counts differ by at most one voxel). Most voxels, background far from the
structure, have (near) zero uncertainty, so ties are broken by a fixed random permutation of the voxels (seeded
``--seed``): without it the order within tied values, and hence the lower deciles' error rates, would depend on
the voxel order. Per decile: mean uncertainty and error rate (predicted label != reference label); also the
error rate of the top decile vs the other 90 %, their ratio, and the share of all wrong voxels that lie in the
top decile; ``u=0 share`` is the fraction of voxels with uncertainty <= 1e-6. Because background dominates, the
same is reported for a region of interest ("roi"): voxels where the reference or the prediction (of that K) is
foreground, dilated by 2 voxels (``scipy.ndimage.binary_dilation``, 2 iterations of the 6-neighbour cross), per
case before pooling.

    M=$nnUNet_results/Dataset004_Hippocampus/MedFlowSegTrainer__MedFlowSegPlans__3d_fullres
    python benchmarks/bench_uncertainty.py -m $M -f 0 --num_samples 1 4 8      # all validation cases, 1 thread
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.uncertainty")
N_BINS = 10


def decile_stats(u: np.ndarray, err: np.ndarray, tiebreak: np.ndarray) -> dict[str, Any]:
    """Pooled uncertainty ``u``, error mask ``err`` and tie-break ranks → per-decile and top-vs-rest numbers."""
    bins = np.array_split(np.lexsort((tiebreak, u)), N_BINS)  # sort by u, ties by the random ranks
    top, rest = bins[-1], np.concatenate(bins[:-1])
    top_err, rest_err = float(err[top].mean()), float(err[rest].mean())
    return {"n_voxels": int(u.size), "n_wrong": int(err.sum()), "zero_share": float((u <= 1e-6).mean()),
            "deciles": [{"decile": i + 1, "n": int(b.size), "mean_uncertainty": float(u[b].mean(dtype=np.float64)),
                         "error_rate": float(err[b].mean())} for i, b in enumerate(bins)],
            "top_error_rate": top_err, "rest_error_rate": rest_err,
            "top_vs_rest": top_err / rest_err if rest_err > 0 else float("inf"),
            "top_share_of_errors": float(err[top].sum() / max(int(err.sum()), 1))}


def load_predictor(args: argparse.Namespace, k: int):
    import torch
    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    predictor = MedFlowSegPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta,
                                    perform_everything_on_device=True, device=torch.device(args.device),
                                    verbose=False, allow_tqdm=False, seed=args.seed, num_samples=k)
    predictor.initialize_from_trained_model_folder(str(args.model), [args.fold], args.checkpoint)
    return predictor


def validation_cases(args: argparse.Namespace, dataset_name: str) -> list[str]:
    splits = args.splits
    if splits is None:
        if "nnUNet_preprocessed" not in os.environ:
            raise SystemExit("set nnUNet_preprocessed or pass --splits PATH/splits_final.json")
        splits = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "splits_final.json"
    cases = sorted(json.loads(Path(splits).read_text())[args.fold]["val"])
    logger.info("%d validation cases of fold %d in %s", len(cases), args.fold, splits)
    return cases[: args.max_cases]


def predict_case(predictor, data, props: dict, k: int, threads: int) -> tuple[float, float, dict[str, np.ndarray]]:
    """(wall s, CPU s, {seg, entropy, disagreement?}) in the raw image geometry."""
    import torch
    from medflowseg_nn.inference.export import case_arrays
    t0, c0 = time.perf_counter(), time.process_time()
    pred = predictor.predict_case(torch.from_numpy(data), with_disagreement=k >= 2)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    arrays = case_arrays(pred.logits, props, predictor.plans_manager, predictor.configuration_manager,
                         predictor.label_manager, disagreement=pred.disagreement, with_entropy=True)
    out = {"seg": np.asarray(arrays.segmentation), "entropy": arrays.entropy}
    if k >= 2:
        out["disagreement"] = arrays.disagreement
    return wall, cpu, out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, required=True, help="trained model folder (plans.json, fold_F/)")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--splits", type=Path, default=None,
                   help="splits_final.json (default $nnUNet_preprocessed/<dataset>/splits_final.json)")
    p.add_argument("--num_samples", type=int, nargs="+", default=[1, 4, 8], help="values of K (default 1 4 8)")
    p.add_argument("--max_cases", type=int, default=None, help="only the first N validation cases (default all)")
    p.add_argument("--tta", action="store_true", help="mirroring TTA (default off)")
    p.add_argument("--seed", type=int, default=0, help="prior seed and tie-break permutation seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = all cores)")
    p.add_argument("-device", default="cpu")
    C.add_output_args(p, "bench_uncertainty.json", work=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    import torch
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    from scipy.ndimage import binary_dilation
    from medflowseg_nn.evaluation import dice
    info = C.machine_info()
    ks = sorted(set(args.num_samples))
    predictors = {k: load_predictor(args, k) for k in ks}
    first = predictors[ks[0]]
    pm, cm, dj = first.plans_manager, first.configuration_manager, first.dataset_json
    name, ending, n_ch = pm.dataset_name, dj["file_ending"], len(dj["channel_names"])
    labels = list(first.label_manager.foreground_labels)
    label_names = {v: n for n, v in dj["labels"].items() if isinstance(v, int)}
    raw = C.shared_data_dir() / name
    cases = validation_cases(args, name)
    pp, reader = cm.preprocessor_class(verbose=False), pm.image_reader_writer_class()

    times = {k: [0.0, 0.0] for k in ks}
    dices: dict[int, list[list[float]]] = {k: [] for k in ks}
    pooled: dict[tuple[int, str], list[np.ndarray]] = {}  # (k, kind) -> per-case flat arrays
    for i, case in enumerate(cases):
        files = [str(raw / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_ch)]
        data, _, props = pp.run_case(files, None, pm, cm, dj)
        ref = reader.read_seg(str(raw / "labelsTr" / f"{case}{ending}"))[0][0]
        for k in ks:
            if i == 0:  # untimed warm-up
                predict_case(predictors[k], data, props, k, threads)
            wall, cpu, out = predict_case(predictors[k], data, props, k, threads)
            times[k][0] += wall
            times[k][1] += cpu
            seg = out["seg"]
            if not all(v.shape == ref.shape for v in out.values()):
                raise RuntimeError(f"{case}: shapes {[v.shape for v in out.values()]} != label {ref.shape}")
            dices[k].append([dice(ref == c, seg == c) for c in labels])
            roi = binary_dilation((ref > 0) | (seg > 0), iterations=2)
            for kind, arr in (("err", seg != ref), ("roi", roi), *((m, out[m]) for m in ("entropy", "disagreement")
                                                                   if m in out)):
                pooled.setdefault((k, kind), []).append(arr.ravel())
            logger.info("%s K=%d: %.2f s, Dice %s", case, k, wall, np.round(dices[k][-1], 3))

    rows_a, rows_b, details = [], [], {}
    base = times[ks[0]][0] / len(cases)
    for k in ks:
        d = np.asarray(dices[k])
        per_class = d.mean(0)
        s_case, cpu_case = times[k][0] / len(cases), times[k][1] / len(cases)
        row = {"K": k, **{f"Dice {label_names.get(c, c)}": float(v) for c, v in zip(labels, per_class)},
               "Dice mean": float(per_class.mean()), "s/case": s_case, "CPU s/case": cpu_case,
               f"time / K={ks[0]}": s_case / base, "(time ratio) / K": s_case / base / (k / ks[0])}
        rows_a.append(row)
        err = np.concatenate(pooled[(k, "err")])
        roi = np.concatenate(pooled[(k, "roi")])
        tiebreak = np.random.default_rng(args.seed).permutation(err.size)
        details[k] = {"dice_per_case": {c: list(map(float, v)) for c, v in zip(cases, d)}, "s_per_case": s_case,
                      "cpu_s_per_case": cpu_case, "deciles": {}}
        for m in ("entropy", "disagreement"):
            if (k, m) not in pooled:
                continue
            u = np.concatenate(pooled[(k, m)])
            for region, mask in (("all", slice(None)), ("roi", roi)):
                st = decile_stats(u[mask], err[mask], tiebreak[mask])
                details[k]["deciles"][f"{m}/{region}"] = st
                common = {"K": k, "map": m, "region": region, "voxels": st["n_voxels"],
                          "u=0 share": f"{st['zero_share']:.3f}"}
                rows_b.append({**common, "row": "error %",
                               **{f"D{b['decile']}": f"{100 * b['error_rate']:.2f}" for b in st["deciles"]},
                               "top err %": f"{100 * st['top_error_rate']:.2f}",
                               "rest err %": f"{100 * st['rest_error_rate']:.2f}",
                               "top/rest": f"{st['top_vs_rest']:.1f}",
                               "errors in top %": f"{100 * st['top_share_of_errors']:.1f}"})
                rows_b.append({**common, "row": "mean u",
                               **{f"D{b['decile']}": f"{b['mean_uncertainty']:.3g}" for b in st["deciles"]}})
    cols_a = list(rows_a[0].keys())
    cols_b = ["K", "map", "region", "voxels", "u=0 share", "row", *[f"D{i}" for i in range(1, N_BINS + 1)],
              "top err %", "rest err %", "top/rest", "errors in top %"]
    table_a, table_b = C.markdown_table(rows_a, cols_a), C.markdown_table(rows_b, cols_b)
    head = (f"{name} fold {args.fold}, {len(cases)} validation case(s), {args.model.name}/{args.checkpoint}, "
            f"TTA {'on' if args.tta else 'off'}, seed {args.seed}, {threads} thread(s), {args.device}")
    print(f"\n{head}\n\nA. Dice (mean over cases) and network time per case (predict_logits_from_preprocessed_data)"
          f"\n{table_a}\n\nB. Error rate per uncertainty decile (pooled voxels, equal-count deciles D1 lowest .. "
          f"D10 highest, ties broken by a seeded random permutation; roi = reference or prediction foreground "
          f"dilated by 2 voxels)\n{table_b}")
    C.write_json(args.out, {"benchmark": "uncertainty", "machine": info,
                            "args": {k: str(v) for k, v in vars(args).items()}, "dataset": name, "cases": cases,
                            "labels": {str(c): label_names.get(c, str(c)) for c in labels}, "summary": rows_a,
                            "deciles": rows_b, "details": {str(k): v for k, v in details.items()},
                            "table_a": table_a, "table_b": table_b})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
