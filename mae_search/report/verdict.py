"""The sentence a report, and a finished search in the terminal, opens with: did pre-training beat the
reference rows, and by how much?

A reader who stops after one line must not come away with the wrong idea. A setting beats a reference
row when its paired (by seed) 95% interval excludes zero in its favour; with one seed there is no
interval, and the sentence says the margin is one seed's.
"""

from __future__ import annotations

import pandas as pd

from mae_search.metrics import BY_NAME
from mae_search.report.labels import REFERENCE_LABELS, factor_columns, setting_label
from mae_search.report.load import completed_final
from mae_search.report.stats import clearly_better, paired_difference, paired_text
from mae_search.search.results import reference_rows
from mae_search.search.space import SearchSpace

# What each protocol's reference rows measure: the probe on both, fine-tuning the untrained encoder only
# (training from scratch; raw pixels have nothing to fine-tune).
COMPARED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear_probe_acc", ("random_init", "raw_pixels")),
    ("finetune_acc", ("random_init",)),
)
LISTED = 4  # winners named one by one; more are counted


def trained_settings(space: SearchSpace, table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, finished final rows) per setting: a grid's settings, or an Optuna search's configurations."""
    done = completed_final(table)
    if done.empty:
        return []
    if space.is_grid:
        cols = factor_columns(space, done)
        if cols:
            return [(setting_label(g.iloc[0], cols), g) for _, g in done.groupby(cols, sort=False, dropna=False)]
    return [(str(key), g) for key, g in done.groupby("tune_trial_id", sort=False)]


def beats(diff: tuple[float, float, int] | None) -> bool:
    """Ahead of a reference: on a 95% interval that excludes zero, or by any margin with one seed."""
    if diff is None:
        return False
    mean, _, n = diff
    return mean > 0 if n == 1 else clearly_better(diff, "max")


def verdict(space: SearchSpace, table: pd.DataFrame) -> str:
    """One paragraph: per protocol, which trained settings beat every reference row and by how much."""
    refs = reference_rows(table)
    settings = trained_settings(space, table)
    if not settings:
        return "**Verdict**: no setting has finished yet, so nothing can be said about pre-training."
    if refs.empty or "reference" not in refs:
        return ("**Verdict**: this search recorded no reference rows, so the table cannot say whether "
                "pre-training helped.")
    parts = [_protocol_sentence(key, kinds, settings, refs) for key, kinds in COMPARED]
    return "**Verdict** (test split): " + " ".join(p for p in parts if p)


def _protocol_sentence(key: str, kinds: tuple[str, ...], settings: list[tuple[str, pd.DataFrame]],
                       refs: pd.DataFrame) -> str:
    spec = BY_NAME[key]
    present = [k for k in kinds if key in refs and refs.loc[refs["reference"] == k, key].notna().any()]
    measured = [(label, g) for label, g in settings if key in g and g[key].notna().any()]
    if not present or not measured:
        return ""
    names = " and ".join(REFERENCE_LABELS[k].removesuffix(" (reference)") for k in present)
    margins = {label: {k: paired_difference(g, refs[refs["reference"] == k], key) for k in present}
               for label, g in measured}
    winners = [label for label, _ in measured if all(beats(d) for d in margins[label].values())]
    best = max(measured, key=lambda item: item[1][key].mean())[0]

    def margin(label: str) -> str:
        return ", ".join(f"{paired_text(margins[label][k], spec)} over "
                         f"{REFERENCE_LABELS[k].removesuffix(' (reference)')}" for k in present)

    what = spec.label.removesuffix(" (%)")
    if not winners:
        return (f"No finished setting beats the {names} on {what} at this budget (the best, {best}: "
                f"{margin(best)} points).")
    shown = sorted(winners, key=lambda label: -dict(measured)[label][key].mean())[:LISTED]
    more = f" and {len(winners) - LISTED} more" if len(winners) > LISTED else ""
    listed = "; ".join(f"{label} {margin(label)}" for label in shown)
    return (f"{len(winners)} of {len(measured)} finished settings beat the {names} on {what} "
            f"(points, paired by seed): {listed}{more}.")
