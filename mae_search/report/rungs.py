"""Whether early stopping could trust its rungs: ASHA stops trials on the metric at a rung, which only
makes sense if that metric ranks trials as their final one does. Over the trials that ran to the end,
the rank correlation (Spearman) between the metric at each rung and at the last epoch says so; a low
one means the stops there were close to random."""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import spearmanr

from mae_search.metrics import metric
from mae_search.report.render import Report, Table
from mae_search.search.record import Status
from mae_search.search.space import SearchSpace

TRUSTED_RHO = 0.5  # below this, a rung's ranking is more noise than signal
MIN_TRIALS = 3  # a rank correlation of fewer trials says nothing


def rung_epochs(space: SearchSpace) -> list[int]:
    """The epochs at which ASHA compares trials (its milestones grace x factor^k below the last epoch),
    as the first reported epoch at or past each milestone; none without ASHA."""
    scheduler = space.scheduler
    if scheduler.type != "asha":
        return []
    last = scheduler.max_epochs or space.base.epochs
    rungs, milestone = [], float(scheduler.grace_period)
    while milestone < last:
        rungs.append(math.ceil(milestone))
        milestone *= scheduler.reduction_factor
    return sorted(set(rungs))


def rung_correlations(space: SearchSpace, table: pd.DataFrame) -> list[tuple[int, int, float | None]]:
    """(rung epoch, trials compared, Spearman rho or None when too few) over the trials that completed."""
    name = space.primary.metric
    trials = table[(table["status"] != Status.REFERENCE)] if "status" in table else table
    if name not in trials or trials.empty:
        return []
    last = space.scheduler.max_epochs or space.base.epochs
    keys = ["search", "trial_id"] if "search" in trials else ["trial_id"]
    by_epoch = trials.pivot_table(index=keys, columns="epoch", values=name, aggfunc="last")
    if last not in by_epoch:
        return []
    out = []
    for rung in rung_epochs(space):
        pairs = by_epoch[[rung, last]].dropna() if rung in by_epoch else pd.DataFrame()
        rho = None
        if len(pairs) >= MIN_TRIALS and pairs[rung].nunique() > 1 and pairs[last].nunique() > 1:
            rho = float(spearmanr(pairs[rung], pairs[last]).statistic)
        out.append((rung, len(pairs), rho))
    return out


def rung_fidelity_table(space: SearchSpace, table: pd.DataFrame, report: Report) -> None:
    """The report's section: one row per rung, and a warning in words for each rung that cannot be trusted."""
    rows = rung_correlations(space, table)
    if not rows:
        return
    label = metric(space.primary.metric).label
    report.heading("Early stopping: do the rungs predict the end?")
    report.text(f"Spearman rank correlation between {label} at each ASHA rung and at the last epoch, over the "
                f"trials that ran to the end (those ASHA stopped have no last epoch, so this is measured on the "
                f"survivors). Below {TRUSTED_RHO} a rung ranks trials unlike their final result.")
    report.table(Table("rungs", ["rung (epoch)", "trials compared", "Spearman ρ"],
                       [[str(rung), str(n), "-" if rho is None else f"{rho:.2f}"] for rung, n, rho in rows]))
    weak = [f"epoch {rung} (ρ = {rho:.2f}, n = {n})" for rung, n, rho in rows if rho is not None and rho < TRUSTED_RHO]
    few = [str(rung) for rung, n, rho in rows if rho is None]
    if weak:
        report.text(f"**Warning**: early stopping at {', '.join(weak)} was close to random stopping on this "
                    "search; a later grace period (or a cheaper but more faithful rung metric) would stop fewer "
                    "trials that would have ended well.")
    if few:
        report.text(f"Too few trials completed to measure the rung{'s' if len(few) > 1 else ''} at epoch "
                    f"{', '.join(few)} (at least {MIN_TRIALS} with differing values are needed).")
