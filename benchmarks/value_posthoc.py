"""Case-level scores added after a ``bench_value.py`` run, from the probabilities it saved (no model, no network).

For every run in the JSON that has ``WORK/value_predictions/RUN/CASE.npz`` files, and for its temperature-scaled
``RUN+T`` twin (T from the JSON), Spearman between 1 − foreground Dice (from the JSON) and
* the expected Dice error (``medflowseg_nn.calibration.expected_dice_error``, reference-free),
* the mean predictive entropy over the whole image (reference-free) — recomputed, a check against the JSON,
* the mean predictive entropy over the PREDICTED foreground dilated by ``--roi_dilation`` voxels (reference-free:
  what a user can compute; the JSON's "roi" entropy uses the reference's ROI, which a user does not have).
Prints a table and writes JSON next to the input.

    python benchmarks/value_posthoc.py /work/bench_work/out_confirm/bench_value_e1i250b7.json --work /work/bench_work
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.value_posthoc")


def case_scores(npz: Path, labels: Sequence[int], temperature: Optional[float], dilation: int
                ) -> tuple[float, float, float]:
    """(expected Dice error, mean entropy over the image, mean entropy over the dilated predicted foreground;
    the whole image when nothing is predicted) of one case's saved probabilities."""
    from medflowseg_nn.calibration import expected_dice_error, predictive_entropy, reference_roi
    from medflowseg_nn.temperature import apply_temperature
    probs = np.load(npz)["probabilities"]
    if temperature is not None:
        probs = apply_temperature(probs, temperature)
    entropy = predictive_entropy(probs)
    roi = reference_roi(probs.argmax(0), dilation)
    return (expected_dice_error(probs, labels), float(entropy.mean()),
            float(entropy[roi].mean() if roi.any() else entropy.mean()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="bench_value_*.json")
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2])
    p.add_argument("--roi_dilation", type=int, default=3, help="dilation of the predicted foreground (voxels)")
    args = p.parse_args(argv)
    C.setup_logging()
    from medflowseg_nn.calibration import spearman
    result = json.loads(args.result.read_text())
    temps = result.get("temperatures", {})
    rows = []
    for rid, cases in result["per_case"].items():
        base = rid[:-2] if rid.endswith("+T") else rid
        folder = args.work / "value_predictions" / base
        if not folder.is_dir():
            logger.info("%s: no saved probabilities, skipped", rid)
            continue
        t = temps.get(base) if rid.endswith("+T") else None
        err, ede, ent, ent_pred = [], [], [], []
        for case, row in cases.items():
            e, h, h_pred = case_scores(folder / f"{case}.npz", args.labels, t, args.roi_dilation)
            err.append(1 - row["dice_fg"])
            ede.append(e)
            ent.append(h)
            ent_pred.append(h_pred)
        rows.append({"run": rid, "T": "" if t is None else round(t, 3), "cases": len(err),
                     "mean 1-Dice": round(float(np.mean(err)), 3), "mean EDE": round(float(np.mean(ede)), 3),
                     "ρ(EDE, 1−Dice)": round(spearman(ede, err).rho, 3),
                     "ρ(H all, 1−Dice)": round(spearman(ent, err).rho, 3),
                     "ρ(H pred-roi, 1−Dice)": round(spearman(ent_pred, err).rho, 3)})
    table = C.markdown_table(rows, list(rows[0]))
    print(f"\n{args.result.name}: reference-free case-level uncertainty vs error\n\n{table}")
    C.write_json(args.result.with_name(args.result.stem + "_posthoc.json"), {"source": str(args.result),
                                                                              "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
