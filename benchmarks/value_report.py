"""Scoring and tables of ``bench_value.py``: per-run accumulation over test cases, mean (min-max) over seeds.

Run as a script, it merges the JSONs of several ``bench_value.py`` runs (e.g. one per seed, trained in separate
processes) into the same tables over all their runs:

    python benchmarks/value_report.py out_s0/bench_value_e1i250b7.json out_s1/bench_value_e1i250b7.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import common as C


class RunScores:
    """Per-run accumulation over test cases: Dice/HD95 per case, pooled calibration (all, roi), entropies."""

    def __init__(self, labels: Sequence[int], roi_dilation: int):
        from medflowseg_nn.calibration import CalibrationAccumulator
        self.labels, self.roi_dilation = list(labels), roi_dilation
        self.acc = {"all": CalibrationAccumulator(), "roi": CalibrationAccumulator()}
        self.cases: dict[str, dict[str, Any]] = {}
        self.seconds: list[float] = []

    def add(self, case: str, probs: np.ndarray, ref: np.ndarray, spacing: np.ndarray, seconds: float,
            out_dir: Optional[Path], ref_img=None) -> float:
        from medflowseg_nn import calibration as cal
        from medflowseg_nn.evaluation import dice, hd95
        seg = probs.argmax(0).astype(np.uint8)
        roi = cal.reference_roi(ref, self.roi_dilation)
        ent = cal.predictive_entropy(probs)
        dices = [dice(ref == c, seg == c) for c in self.labels]
        row = {"dice": dices, "dice_fg": float(np.mean(dices)),
               "hd95": [hd95(ref == c, seg == c, spacing) for c in self.labels], "seconds": seconds,
               "entropy_all": float(ent.mean()), "entropy_roi": float(ent[roi].mean()) if roi.any() else float("nan"),
               "expected_dice_error": cal.expected_dice_error(probs, self.labels)}
        for region, mask in (("all", None), ("roi", roi)):
            one = cal.CalibrationAccumulator()
            one.update(probs, ref, mask)
            self.acc[region].merge(one)
            row[region] = one.result().to_dict()
        self.cases[case] = row
        self.seconds.append(seconds)
        if out_dir is not None:
            import SimpleITK as sitk
            out_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out_dir / f"{case}.npz", probabilities=probs)
            img = sitk.GetImageFromArray(seg)
            img.CopyInformation(ref_img)
            sitk.WriteImage(img, str(out_dir / f"{case}.nii.gz"))
        return row["dice_fg"]

    def summary(self) -> dict[str, Any]:
        from medflowseg_nn.calibration import spearman
        rows = list(self.cases.values())
        hd = np.asarray([r["hd95"] for r in rows], dtype=float)
        err = [1 - r["dice_fg"] for r in rows]
        hd_label = [np.mean(h[np.isfinite(h)]) for h in hd.T if np.isfinite(h).any()]  # finite mean per label
        out: dict[str, Any] = {"dice_fg": float(np.mean([r["dice_fg"] for r in rows])),
                               "hd95": float(np.mean(hd_label)) if hd_label else float("nan"),
                               "hd95_n_inf": int((~np.isfinite(hd)).sum()), "s_per_case": float(np.mean(self.seconds)),
                               "n_cases": len(rows)}
        for region in ("all", "roi"):
            res = self.acc[region].result()
            out[region] = res.to_dict()
            out[f"spearman_{region}"] = spearman([r[f"entropy_{region}"] for r in rows], err).to_dict()
        out["spearman_ede"] = spearman([r["expected_dice_error"] for r in rows], err).to_dict()
        return out


def fmt(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "n/a"
    if len(values) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def tables(results: dict[str, list[dict]]) -> tuple[str, str]:
    seg_rows, cal_rows = [], []
    for method, runs in results.items():
        get = lambda f: [f(r) for r in runs]  # noqa: E731
        seg_rows.append({"method": method, "runs": len(runs), "Dice": fmt(get(lambda r: r["dice_fg"])),
                         "HD95 mm": fmt(get(lambda r: r["hd95"]), 2), "HD95 inf": sum(get(lambda r: r["hd95_n_inf"])),
                         "s/case": fmt(get(lambda r: r["s_per_case"]), 2),
                         "ρ(H, 1−Dice) roi": fmt(get(lambda r: r["spearman_roi"]["rho"]), 2),
                         "ρ all": fmt(get(lambda r: r["spearman_all"]["rho"]), 2),
                         "ρ(EDE, 1−Dice)": fmt(get(lambda r: r.get("spearman_ede", {}).get("rho")), 2)})
        row = {"method": method}
        for region in ("all", "roi"):
            for key, label in (("ece", "ECE"), ("brier", "Brier"), ("nll", "NLL"), ("aurc", "AURC")):
                row[f"{label} {region}"] = fmt(get(lambda r: r[region][key]), 4 if region == "all" else 3)
        cal_rows.append(row)
    return (C.markdown_table(seg_rows, list(seg_rows[0])), C.markdown_table(cal_rows, list(cal_rows[0])))


def merge(payloads: Sequence[dict]) -> dict[str, list[dict]]:
    """``results`` of several bench_value payloads: per method row, the runs of all payloads (first-seen row
    order; a row only some payloads have keeps just their runs)."""
    merged: dict[str, list[dict]] = {}
    for payload in payloads:
        for method, runs in payload["results"].items():
            merged.setdefault(method, []).extend(runs)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="bench_value_*.json files")
    p.add_argument("--out", type=Path, default=None, help="write the merged tables (markdown) here")
    args = p.parse_args(argv)
    payloads = [json.loads(f.read_text()) for f in args.json]
    seg, cal = tables(merge(payloads))
    text = "\n".join(f"- {f}: {pl.get('head', '')}" for f, pl in zip(args.json, payloads)) + f"\n\n{seg}\n\n{cal}\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
