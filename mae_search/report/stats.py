"""The statistics behind a report's claims: paired (by seed) differences with t-intervals, which setting
is separable from the rest, margins over the reference rows, and the accuracy-vs-cost Pareto front."""

from __future__ import annotations

import math

import pandas as pd

from mae_search.metrics import BY_NAME, Metric
from mae_search.report.labels import (
    REFERENCE_LABELS,
)
from mae_search.search.record import Status


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[float, float, int] | None:
    """Mean of per-seed differences a - b with a 95% t-interval half-width.

    Pairs are matched on (search, seed): seeds of different searches are different runs, and a seed
    recorded twice in one search counts once (its mean), so combining reports never multiplies pairs.
    """
    from scipy import stats

    keys = ["search", "seed"] if "search" in a and "search" in b else ["seed"]
    merged = _per_pair(a, keys, metric).merge(_per_pair(b, keys, metric), on=keys, suffixes=("_a", "_b"))
    n = len(merged)
    if n == 0:
        return None
    diff = merged[f"{metric}_a"] - merged[f"{metric}_b"]
    half = float("nan") if n < 2 else float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    return float(diff.mean()), half, n


def _per_pair(rows: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    if metric not in rows:
        return pd.DataFrame(columns=[*keys, metric])
    return rows[[*keys, metric]].dropna().groupby(keys, as_index=False)[metric].mean()


def paired_text(diff: tuple[float, float, int] | None, spec: Metric) -> str:
    if diff is None:
        return "n/a"
    mean, half, n = diff
    ci = "" if math.isnan(half) else f" ± {half * spec.scale:.{spec.digits}f}"
    return f"{mean * spec.scale:+.{spec.digits}f}{ci} (n={n})"


def clearly_better(diff: tuple[float, float, int] | None, mode: str) -> bool:
    """Whether a paired difference a - b puts a ahead with a 95% interval that excludes zero."""
    if diff is None or math.isnan(diff[1]):
        return False
    mean, half, _ = diff
    return (mean - half > 0) if mode == "max" else (mean + half < 0)


def separable_best(groups: list[pd.DataFrame], labels: list[str], spec: Metric | None,
                   mode: str) -> tuple[int | None, str]:
    """The setting that beats every other one on a paired 95% interval, if one does, and the verdict.

    At most one setting can beat all others. When none does, the verdict names the settings the one
    with the best mean cannot be separated from, so a reader sees which differences are noise.
    """
    if spec is None:
        return None, ""
    means = [g[spec.name].mean() if spec.name in g and not g.empty else float("nan") for g in groups]
    ranked = sorted((i for i, m in enumerate(means) if not math.isnan(m)),
                    key=lambda i: -means[i] if mode == "max" else means[i])
    if not ranked:
        return None, ""
    if len(ranked) == 1:
        return None, (f"Only {labels[ranked[0]]} has finished trials: there is nothing to compare it with, "
                      "so no row is marked best.")
    diffs = {(i, j): paired_difference(groups[i], groups[j], spec.name) for i in ranked for j in ranked if i != j}
    for i in ranked:
        others = [j for j in ranked if j != i]
        if all(clearly_better(diffs[i, j], mode) for j in others):
            against = "; ".join(f"{labels[j]} {paired_text(diffs[i, j], spec)}" for j in others)
            return i, (f"Best {spec.label}: {labels[i]}, ahead of every other setting on paired 95% intervals "
                       f"({against}).")
    leader = ranked[0]
    tied = [j for j in ranked[1:] if not clearly_better(diffs[leader, j], mode)]
    against = "; ".join(f"{labels[j]} {paired_text(diffs[leader, j], spec)}" for j in tied)
    return None, (f"**Not separable at this n**: the highest mean {spec.label}, {labels[leader]}, cannot be "
                  f"separated from {_names([labels[j] for j in tied])} (paired differences, 95% t-interval: "
                  f"{against}); no row is marked best.")


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def reference_margins(groups: list[pd.DataFrame], labels: list[str], refs: pd.DataFrame) -> str:
    """Each setting's margin over the random-init reference (paired by seed) and over raw pixels, per metric."""
    if refs.empty or "reference" not in refs:
        return ""
    parts = []
    for key in ("linear_probe_acc", "finetune_acc"):
        spec = BY_NAME[key]
        for kind in ("random_init", "raw_pixels"):
            ref = refs[refs["reference"] == kind]
            if key not in ref or ref[key].isna().all():
                continue
            cells = [f"{label} {paired_text(paired_difference(g, ref, key), spec)}"
                     for label, g in zip(labels, groups, strict=True) if key in g and not g.empty]
            if cells:
                parts.append(f"{spec.label} minus {REFERENCE_LABELS[kind].removesuffix(' (reference)')}: "
                             + "; ".join(cells) + ".")
    return ("**Against the reference rows** (paired by seed, 95% t-interval): " + " ".join(parts)) if parts else ""


def pareto_front(done: pd.DataFrame, metric: str, mode: str, cost: str = "pretrain_time_s") -> pd.DataFrame:
    """Trials no other trial beats on both the metric and pretraining time."""
    if metric not in done or cost not in done or done.empty:
        return done.iloc[0:0]
    sign = 1 if mode == "max" else -1
    keep = []
    for i, r in done.iterrows():
        dominated = ((sign * done[metric] >= sign * r[metric]) & (done[cost] <= r[cost])
                     & ((sign * done[metric] > sign * r[metric]) | (done[cost] < r[cost]))).any()
        if not dominated:
            keep.append(i)
    return done.loc[keep].sort_values([cost, "trial_id"])


def at_common_rung(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """Each completed or stopped trial's row at the latest epoch all of them reported ``metric`` at."""
    rows = table[table["status"].isin([Status.COMPLETED, Status.STOPPED])]
    if metric not in rows or rows.empty:
        return rows.iloc[0:0], 0
    rows = rows.dropna(subset=[metric])
    rung = int(rows.groupby("trial_id")["epoch"].max().min()) if not rows.empty else 0
    return rows[rows["epoch"] == rung].reset_index(drop=True), rung
