"""Case-level scores added after a ``bench_value.py`` run, from the probabilities it saved (no model, no network).

For every run in the JSON that has ``WORK/value_predictions/RUN/CASE.npz`` files, and for its temperature-scaled
``RUN+T`` twin (T from the JSON), Spearman between 1 − foreground Dice (from the JSON) and
* the expected Dice error (``medflowseg_nn.calibration.expected_dice_error``, reference-free),
* the mean predictive entropy over the whole image (reference-free) — recomputed, a check against the JSON.
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


def case_scores(npz: Path, labels: Sequence[int], temperature: Optional[float]) -> tuple[float, float]:
    from medflowseg_nn.calibration import expected_dice_error, predictive_entropy
    from medflowseg_nn.temperature import apply_temperature
    probs = np.load(npz)["probabilities"]
    if temperature is not None:
        probs = apply_temperature(probs, temperature)
    return expected_dice_error(probs, labels), float(predictive_entropy(probs).mean())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="bench_value_*.json")
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2])
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
        err, ede, ent = [], [], []
        for case, row in cases.items():
            e, h = case_scores(folder / f"{case}.npz", args.labels, t)
            err.append(1 - row["dice_fg"])
            ede.append(e)
            ent.append(h)
        rows.append({"run": rid, "T": "" if t is None else round(t, 3), "cases": len(err),
                     "mean 1-Dice": round(float(np.mean(err)), 3), "mean EDE": round(float(np.mean(ede)), 3),
                     "ρ(EDE, 1−Dice)": round(spearman(ede, err).rho, 3),
                     "ρ(H all, 1−Dice)": round(spearman(ent, err).rho, 3)})
    table = C.markdown_table(rows, list(rows[0]))
    print(f"\n{args.result.name}: reference-free case-level uncertainty vs error\n\n{table}")
    C.write_json(args.result.with_name(args.result.stem + "_posthoc.json"), {"source": str(args.result),
                                                                              "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
