"""Fold ensembles of ``bench_value.py``: the mean of the member runs' probabilities, and its tempered row.

An ensemble is a list of bench_value run ids, one model per cross-validation fold (nnU-Net's models, or ours at
one step). Its "+ T" row tempers each member with the member's own temperature, fitted on the validation cases of
that member's own fold, then averages: no case is unseen by all members (fold k's validation cases are in the
other folds' training), so one temperature for the ensemble could not be fitted honestly. Each member is also
scored alone (row "…: each member alone", one run per fold, its "+ T" with its own fold's T): how much one model's
scores vary with the fold it was trained and tempered on, beside what averaging the folds gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class FoldEnsemble:
    """``run_id``: the ensemble's score key; ``row``: its table row; ``members``: the member run ids, one per
    fold of ``folds``; ``temperatures``: member run id → its own T (empty: no "+ T" row)."""

    run_id: str
    row: str
    folds: tuple[int, ...]
    members: tuple[str, ...]
    temperatures: Mapping[str, float] = field(default_factory=dict)

    @property
    def member_row(self) -> str:
        return f"{self.row}: each member alone"

    def rows(self) -> dict[str, str]:
        """Score key → table row of everything this ensemble fills: itself and each member alone (one key per
        fold), and their "+ T" twins when the members are tempered."""
        keys = {self.run_id: self.row, **{f"{self.run_id}|f{f}": self.member_row for f in self.folds}}
        return {**keys, **({f"{k}+T": f"{r} + T" for k, r in keys.items()} if self.temperatures else {})}

    def add(self, case: str, outputs: Mapping[str, tuple[np.ndarray, float]], scores: Mapping[str, Any],
            ref: np.ndarray, spacing: np.ndarray, pred_root: Optional[Path], img: Any = None) -> float:
        """Score one case from the members' ``outputs`` (run id → (probabilities ``[C, *S]``, network seconds));
        the ensemble's seconds are the sum of its members'. Returns the ensemble's mean foreground Dice."""
        from medflowseg_nn.temperature import apply_temperature
        seconds = float(sum(outputs[m][1] for m in self.members))
        tempered = {m: apply_temperature(outputs[m][0], t) for m, t in self.temperatures.items()}  # once each
        for f, m in zip(self.folds, self.members):
            scores[f"{self.run_id}|f{f}"].add(case, outputs[m][0], ref, spacing, outputs[m][1], None, img)
            if tempered:
                scores[f"{self.run_id}|f{f}+T"].add(case, tempered[m], ref, spacing, outputs[m][1], None, img)
        mean = np.mean([outputs[m][0] for m in self.members], axis=0)
        dice = scores[self.run_id].add(case, mean, ref, spacing, seconds, pred_root and pred_root / self.run_id,
                                       img)
        if tempered:
            scores[f"{self.run_id}+T"].add(case, np.mean([tempered[m] for m in self.members], axis=0), ref,
                                           spacing, seconds, None, img)
        return dice


def fold_ensemble(run_id: str, row: str, folds: Sequence[int], member_id: Callable[[int], str],
                  known: Mapping[str, float], fit: Optional[Callable[[str, int], float]]) -> FoldEnsemble:
    """The ensemble of the runs ``member_id(fold)`` for ``folds``. ``fit(run_id, fold)`` fits a member's T on its
    own fold's validation cases (a T already in ``known`` is reused); ``fit=None``: no temperatures."""
    members = tuple(member_id(f) for f in folds)
    temps = {} if fit is None else {m: known[m] if m in known else fit(m, f) for f, m in zip(folds, members)}
    return FoldEnsemble(run_id, row, tuple(folds), members, temps)
