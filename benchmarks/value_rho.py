"""Does one model's case-level flag find the bad cases better than another's, beyond the test cases drawn? (issue #9)

Reads ``value_product.py`` JSON files (their rows carry every test case's Dice and case-level uncertainties). For
the rows whose model name contains ``--ours`` and those containing ``--baseline``, per seed present in both, and
for each flag — ``rho`` (mean entropy in the reference ROI), ``rho_all`` (mean entropy of the whole case),
``rho_ede`` (expected Dice error; the last two need no reference) — it prints Spearman ρ(flag, 1 − Dice) of each
model, their difference per seed, the mean difference over the seeds and a paired bootstrap over the test cases:
every resample draws the same cases for every seed and both models (the seeds share the 40 test cases, so the case
draw is the noise they have in common), giving the 95 % interval of the mean difference and the share of resamples
where it is ≤ 0. Spearman ρ of a resample is the Pearson correlation of its average ranks
(``scipy.stats.rankdata``), what ``scipy.stats.spearmanr`` computes, vectorised over the resamples.

    python benchmarks/value_rho.py OUT/value_product_*.json --ours "(the product)" --baseline "nnU-Net single"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

FLAGS = {"rho": "entropy_roi", "rho_all": "entropy_all", "rho_ede": "expected_dice_error"}


def spearman_rows(u: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row pair of ``u``, ``e`` ``[B, n]`` (average ranks; NaN for a constant row)."""
    from scipy.stats import rankdata
    ru, re = rankdata(u, axis=1), rankdata(e, axis=1)
    ru, re = ru - ru.mean(1, keepdims=True), re - re.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ru * re).sum(1) / np.sqrt((ru ** 2).sum(1) * (re ** 2).sum(1))


def paired_rows(results: Sequence[dict], ours: str, baseline: str) -> dict[int, tuple[dict, dict]]:
    """``{seed: (our row, baseline row)}`` for the seeds with exactly one row of each in ``results``' rows."""
    found: dict[int, dict[str, list[dict]]] = {}
    for result in results:
        for row in result["rows"]:
            for key, name in (("ours", ours), ("baseline", baseline)):
                if name in row["model"] and "per_case" in row:
                    found.setdefault(int(row["seed"]), {"ours": [], "baseline": []})[key].append(row)
    pairs = {s: (r["ours"][0], r["baseline"][0]) for s, r in sorted(found.items())
             if len(r["ours"]) == 1 and len(r["baseline"]) == 1}
    if not pairs:
        raise SystemExit(f"no seed has one row containing {ours!r} and one containing {baseline!r}")
    return pairs


def compare(pairs: dict[int, tuple[dict, dict]], flag: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """ρ of both models per seed, the differences, their mean and the bootstrap over the shared test cases."""
    cases = sorted(next(iter(pairs.values()))[0]["per_case"])
    if any(sorted(r["per_case"]) != cases for pair in pairs.values() for r in pair):
        raise SystemExit("the rows were not scored on the same test cases")
    rng = np.random.default_rng(seed)
    draw = np.vstack([np.arange(len(cases)), rng.integers(0, len(cases), (n_boot, len(cases)))])  # row 0: as is
    per_seed, diffs = {}, []
    for s, pair in pairs.items():
        rho = []
        for row in pair:
            u = np.array([row["per_case"][c][FLAGS[flag]] for c in cases], dtype=float)
            e = np.array([1 - row["per_case"][c]["dice_fg"] for c in cases], dtype=float)
            rho.append(spearman_rows(u[draw], e[draw]))
        per_seed[s] = {"ours": float(rho[0][0]), "baseline": float(rho[1][0])}
        diffs.append(rho[0] - rho[1])
    mean = np.nanmean(np.vstack(diffs), 0)
    boot = mean[1:]
    return {"flag": flag, "per_seed": per_seed, "mean_ours": float(np.mean([v["ours"] for v in per_seed.values()])),
            "mean_baseline": float(np.mean([v["baseline"] for v in per_seed.values()])),
            "mean_difference": float(mean[0]), "ci95": [float(np.nanpercentile(boot, 2.5)),
                                                        float(np.nanpercentile(boot, 97.5))],
            "p_not_higher": float(np.mean(boot <= 0)), "n_cases": len(cases), "n_boot": n_boot}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", type=Path, help="value_product JSON files")
    p.add_argument("--ours", default="(the product)", help="part of our row's model name")
    p.add_argument("--baseline", default="nnU-Net single", help="part of the baseline row's model name")
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None, help="write the comparison here (JSON)")
    args = p.parse_args(argv)
    pairs = paired_rows([json.loads(f.read_text()) for f in args.json], args.ours, args.baseline)
    out = [compare(pairs, flag, args.n_boot) for flag in FLAGS]
    print(f"| flag | seeds | ρ ours per seed | ρ baseline per seed | mean ours | mean baseline | Δ mean | 95 % CI "
          f"(cases) | P(Δ ≤ 0) |\n|---|---|---|---|---|---|---|---|---|")
    for r in out:
        ours, base = ([v[k] for v in r["per_seed"].values()] for k in ("ours", "baseline"))
        cells = [r["flag"], " / ".join(map(str, r["per_seed"])), " / ".join(f"{v:.2f}" for v in ours),
                 " / ".join(f"{v:.2f}" for v in base), f"{r['mean_ours']:.3f}", f"{r['mean_baseline']:.3f}",
                 f"{r['mean_difference']:+.3f}", f"{r['ci95'][0]:+.3f} … {r['ci95'][1]:+.3f}",
                 f"{r['p_not_higher']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps({"ours": args.ours, "baseline": args.baseline, "flags": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
