"""``mfs_evaluate``: evaluate a folder of predicted segmentations against reference labels.

Example::

    mfs_evaluate -ref nnUNet_raw/Dataset001/labelsTr -pred predictions/ -l 1 2 --regions "1,2" --tolerance 2

Prints a compact per-class table (mean Dice, HD95, NSD) and writes the full summary JSON (default
``PRED_DIR/summary_mfs.json``). See :mod:`medflowseg_nn.evaluation` for metric definitions and conventions.

With ``--probabilities DIR`` (the ``CASE.npz`` files of ``mfs_predict --save_probabilities`` or nnU-Net's
predictor, one per segmentation in ``-pred``) it also prints a calibration table (ECE, Brier, NLL, AURC over all
voxels and over the reference foreground dilated by ``--roi_dilation`` voxels; Spearman between each case's mean
predictive entropy and 1 - its mean foreground Dice from ``-pred``) and stores it in the summary JSON under
``"calibration"``; see :mod:`medflowseg_nn.calibration_folder`. It also draws the reliability diagram next to the
summary (``summary_mfs_reliability.png``; :mod:`medflowseg_nn.reliability_plot`). Without it, output is unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from medflowseg_nn.calibration_folder import (case_foreground_dice, evaluate_probability_folder,
                                              format_calibration_table)
from medflowseg_nn.errors import UserError
from medflowseg_nn.evaluation import LabelOrRegion, evaluate_folder
from medflowseg_nn.reliability_plot import save_reliability_diagram


def _parse_region(text: str) -> tuple[int, ...]:
    """Parse ``"1,2"`` (or ``"(1, 2)"``) into a region tuple."""
    try:
        region = tuple(int(t) for t in text.strip().strip("()").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid region {text!r}: expected comma-separated integers like '1,2'")
    if not region:
        raise argparse.ArgumentTypeError(f"invalid region {text!r}: empty")
    return region


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``mfs_evaluate``."""
    p = argparse.ArgumentParser(prog="mfs_evaluate", description="Evaluate predicted segmentations (Dice, HD95, "
                                "NSD, volume difference) against reference labels; files are matched by name.")
    p.add_argument("-ref", required=True, help="folder with the reference segmentations")
    p.add_argument("-pred", required=True, help="folder with the predicted segmentations")
    p.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                   help="labels to evaluate (default, if neither -l nor --regions is given: all nonzero labels found "
                   "in the references)")
    p.add_argument("--regions", type=_parse_region, nargs="+", default=None,
                   help='regions (unions of labels) to evaluate in addition to -l, e.g. --regions "1,2" "2"')
    p.add_argument("-o", "--output", default=None, help="output JSON (default: PRED_DIR/summary_mfs.json)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default: 1.0)")
    p.add_argument("--file_ending", default=".nii.gz", help="file ending of the segmentations (default: .nii.gz)")
    p.add_argument("-np", "--num_processes", type=int, default=1, help="number of worker processes (default: 1)")
    p.add_argument("--probabilities", default=None, metavar="DIR",
                   help="folder with CASE.npz probability files (mfs_predict --save_probabilities): also report "
                   "calibration (ECE, Brier, NLL, AURC) and uncertainty-vs-error Spearman")
    p.add_argument("--roi_dilation", type=int, default=3,
                   help="calibration ROI = reference foreground dilated by this many voxels, cube (default: 3)")
    return p


def _fmt(value: float | None, digits: int) -> str:
    """Format a summary value (``None`` = non-finite)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """Compact table of mean Dice / HD95 / NSD per class plus the foreground mean."""
    rows = [("class", "Dice", "HD95 [mm]", "NSD", "HD95 inf")]
    for key, m in result["mean"].items():
        rows.append((key, _fmt(m["Dice"], 4), _fmt(m["HD95"], 2), _fmt(m["NSD"], 4), str(m["HD95_n_inf"])))
    fg = result["foreground_mean"]
    rows.append(("fg mean", _fmt(fg["Dice"], 4), _fmt(fg["HD95"], 2), _fmt(fg["NSD"], 4), str(fg["HD95_n_inf"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success and 2 on usage errors (missing folder, no/unmatched files, ...)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse errors (code 2) and --help (code 0)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    labels: list[LabelOrRegion] | None = None
    if args.labels is not None or args.regions is not None:
        labels = list(args.labels or []) + list(args.regions or [])
    output = args.output if args.output is not None else os.path.join(args.pred, "summary_mfs.json")
    if args.num_processes < 1:
        print(f"{parser.prog}: error: -np must be >= 1, got {args.num_processes}", file=sys.stderr)
        return 2
    if args.roi_dilation < 0:
        print(f"{parser.prog}: error: --roi_dilation must be >= 0, got {args.roi_dilation}", file=sys.stderr)
        return 2
    try:
        calibration = None
        if args.probabilities is not None and not os.path.isdir(args.probabilities):
            raise UserError(f"probabilities folder does not exist: {args.probabilities} (the -o folder of "
                            "mfs_predict --save_probabilities)")
        result = evaluate_folder(args.ref, args.pred, labels=labels, tolerance_mm=args.tolerance,
                                 file_ending=args.file_ending, num_processes=args.num_processes,
                                 output_file=None if args.probabilities is not None else output)
        if args.probabilities is not None:  # the summary is written once, with the calibration in it
            calibration = evaluate_probability_folder(
                args.ref, args.probabilities, case_foreground_dice(result, args.file_ending),
                roi_dilation=args.roi_dilation, file_ending=args.file_ending)
            result["calibration"] = calibration
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "w") as f:
                json.dump(result, f, indent=2, sort_keys=True, allow_nan=False)
            diagram = save_reliability_diagram(calibration["dataset"], os.path.splitext(output)[0] +
                                               "_reliability.png", title=os.path.abspath(args.probabilities))
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(result['metric_per_case'])} case(s), NSD tolerance {args.tolerance} mm")
    print(format_table(result))
    if calibration is not None:
        print(f"\ncalibration of {args.probabilities} (top-label, {calibration['settings']['n_bins']} bins; roi = "
              f"reference foreground dilated by {args.roi_dilation} voxels, cube)")
        print(format_calibration_table(calibration))
        print(f"reliability diagram written to {diagram}")
    print(f"summary written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
