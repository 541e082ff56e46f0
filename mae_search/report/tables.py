"""The report's tables: the paper-style ablation table per factor (reference rows on top), an Optuna
search's best trials, parameter importances, the Pareto front, and the trials stopped early or failed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mae_search.metrics import BY_NAME, Metric, metric
from mae_search.report.labels import (
    METRICS,
    REFERENCE_LABELS,
    expected_settings,
    factor_columns,
    fmt_metric,
    fmt_setting,
    round_value,
    setting_label,
    sort_key,
)
from mae_search.report.load import (
    completed_final,
)
from mae_search.report.render import (
    Report,
    Table,
)
from mae_search.report.stats import (
    at_common_rung,
    paired_difference,
    paired_text,
    pareto_front,
    reference_margins,
    separable_best,
)
from mae_search.search.record import PARAM_PREFIX, Status
from mae_search.search.results import final_rows, reference_rows
from mae_search.search.space import SearchSpace


def ablation_tables(space: SearchSpace, table: pd.DataFrame, report: Report) -> None:
    """One table per factor. With several grid factors (decoder depth x width), each factor's table
    holds the others at the best setting -- as the paper holds them at its defaults -- and a last
    table lists every combination."""
    cols = factor_columns(space, table)
    refs = reference_rows(table)
    if len(cols) <= 1:
        report.heading("Ablation")
        ablation_table(space, table, report, cols, "ablation", refs)
        return
    best = _best_setting(space, table, cols)
    for col in cols:
        name = col.removeprefix("param.")
        report.heading(f"Ablation: {space.label_of(col)}")
        if best is None:
            report.text("No finished trial yet.")
            continue
        others = {c: v for c, v in best.items() if c != col}
        report.text("Other factors held at the best setting: "
                    + ", ".join(f"{space.label_of(c)} = {fmt_setting(v)}" for c, v in others.items()) + ".")
        mask = np.logical_and.reduce([table[c] == v for c, v in others.items()])
        ablation_table(space, table[mask], report, [col], f"ablation_{name.split('.')[-1]}", refs)
    report.heading("All settings")
    ablation_table(space, table, report, cols, "ablation_all", refs)



def _best_setting(space: SearchSpace, table: pd.DataFrame, cols: list[str]) -> dict[str, Any] | None:
    done = completed_final(table)
    if done.empty or space.primary.metric not in done:
        return None
    means = done.groupby(cols)[space.primary.metric].mean()
    key = means.idxmax() if space.primary.mode == "max" else means.idxmin()
    return dict(zip(cols, key if isinstance(key, tuple) else (key,), strict=True))



def ablation_table(space: SearchSpace, table: pd.DataFrame, report: Report, cols: list[str], name: str,
                   refs: pd.DataFrame) -> None:
    """The paper-style table: reference rows, then a row per setting, mean ± std over seeds, Δ vs baseline.

    A setting is bold only when the paired 95% interval of its difference to
    the runner-up excludes zero; otherwise the report says the best settings
    are not separable at this n.
    """
    final = final_rows(table)
    done = final[final["status"] == Status.COMPLETED]
    primary = BY_NAME.get(space.primary.metric)
    shown = distinct_references(refs)  # the rows shown; pairing below stays within each search
    metrics = [m for m in METRICS if m.in_tables and (m.name in done.columns or m.name in shown.columns)]
    declared = expected_settings(space, cols)  # the file's order (original first, as written)
    settings = sorted({tuple(r) for r in final[cols].itertuples(index=False)},
                      key=lambda s: (declared.index(s), ()) if s in declared else (len(declared), sort_key(s)))
    baseline = _baseline_setting(space, cols, settings)
    headers = [", ".join(space.label_of(c) for c in cols), "n", *[m.label for m in metrics]]
    with_delta = baseline is not None and primary is not None
    if with_delta:
        headers.append(f"Δ {primary.label} vs {fmt_setting(baseline[0])} (95% CI)")
    headers.append("stopped / failed")
    rows = [[label, str(len(group)), *cells, *(["-"] if with_delta else []), "-"]
            for label, group, cells in reference_cells(shown, metrics)]
    first_setting = len(rows)
    groups = []
    for setting in settings:
        mask = np.logical_and.reduce([final[c] == v for c, v in zip(cols, setting, strict=True)])
        group_all = final[mask]
        group = group_all[group_all["status"] == Status.COMPLETED]
        groups.append(group)
        label = setting_label(pd.Series(dict(zip(cols, setting, strict=True))), cols)
        row = [label + (" (baseline)" if baseline == setting else ""), str(len(group))]
        row += [fmt_metric(m, group[m.name]) if m.name in group else "-" for m in metrics]
        if with_delta:
            row.append(_delta_cell(final, cols, baseline, setting, group, primary))
        stopped = int((group_all["status"] == Status.STOPPED).sum())
        failed = int((group_all["status"] == Status.FAILED).sum())
        row.append(f"{stopped} / {failed}")
        rows.append(row)
    labels = [r[0] for r in rows[first_setting:]]
    best, verdict = separable_best(groups, labels, primary, space.primary.mode)
    caption = ("Final metrics of finished trials; mean ± std over seeds where n > 1. Reference rows: the same "
               "evaluation of each seed's untrained encoder (fine-tuning it is training from scratch) and of raw "
               "pixels. Bold: the setting whose paired (by seed) 95% interval against every other setting "
               "excludes zero in its favour. Δ: paired by seed against the baseline, mean with 95% t-interval.")
    if f"{PARAM_PREFIX}loss.target" in cols:  # the rows' losses are in different spaces
        caption += (" Held-out masked MSE is each row's own target (pixels, normalised pixels, PCA coefficients or "
                    "HOG), not comparable across rows; PSNR compares pixels (a HOG target has none).")
    evaluated, mismatch = evaluation_sets(pd.concat([done, refs]))
    quality = tuple(2 + k for k, m in enumerate(metrics) if m.source != "time" and not m.name.endswith("_time_s"))
    report.table(Table(name, headers, rows, None if best is None else first_setting + best,
                       f"{caption} {evaluated}".strip(), bold_columns=(0, *quality)))
    if mismatch:
        report.text(mismatch)
    if verdict:
        report.text(verdict)
    margins = reference_margins(groups, labels, refs)
    if margins:
        report.text(margins)
    missing = [label for label, g in zip(labels, groups, strict=True)
               if primary is None or g.empty or g[primary.name].isna().all()]
    missing += [fmt_setting(s[0]) if len(s) == 1 else str(s) for s in declared if s not in settings]
    if missing:
        report.text(f"**Missing**: no finished trial yet for {', '.join(missing)}.")



def evaluation_sets(rows: pd.DataFrame) -> tuple[str, str]:
    """(what the probe and k-NN numbers were measured on, a warning when rows were measured on different
    labelled sets). A prepared set's last epoch uses every labelled image, its earlier ones a subset, and a
    search's rows are comparable only if all of them, reference rows included, used the same."""
    if "eval_train_images" not in rows or rows["eval_train_images"].isna().all():
        return "", ""  # recorded before the counts were
    counts = rows[["eval_train_images", "eval_test_images"]].dropna()
    sets = sorted({(int(a), int(b)) for a, b in counts.itertuples(index=False)})
    if len(sets) == 1:
        (train, test), = sets
        return f"Probe and k-NN on {train:,} labelled training and {test:,} test images.", ""
    listed = "; ".join(f"{a:,} / {b:,}" for a, b in sets)
    return "", (f"**Not comparable**: these rows' probe and k-NN numbers come from different labelled sets "
                f"(train / test images: {listed}).")



def distinct_references(refs: pd.DataFrame) -> pd.DataFrame:
    """Reference rows counted once: combined searches that share a data set and seeds each record the
    same untrained-encoder and raw-pixel runs, which would otherwise repeat (and inflate n) per search."""
    if refs.empty:
        return refs
    same = [c for c in refs.columns if c not in ("search", "trial_id", "tune_trial_id", "trial_time_s")
            and not c.endswith("_time_s")]
    return refs.drop_duplicates(subset=same).reset_index(drop=True)


def reference_cells(refs: pd.DataFrame, metrics: list[Metric]) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(label, rows, formatted metric cells) of each reference kind the table holds, in REFERENCE_LABELS order."""
    out = []
    for kind, label in REFERENCE_LABELS.items():
        group = refs[refs["reference"] == kind] if "reference" in refs else refs.iloc[0:0]
        if not group.empty:
            out.append((label, group, [fmt_metric(m, group[m.name]) if m.name in group else "-" for m in metrics]))
    return out



def _baseline_setting(space: SearchSpace, cols: list[str], settings: list[tuple]) -> tuple | None:
    if space.baseline is None or len(cols) != 1:
        return None
    for s in settings:
        if s[0] == space.baseline or fmt_setting(s[0]) == fmt_setting(space.baseline):
            return s
    return None



def _delta_cell(final, cols, baseline, setting, group, primary: Metric) -> str:
    if setting == baseline:
        return "-"
    base_mask = final[cols[0]] == baseline[0]
    base = final[base_mask & (final["status"] == Status.COMPLETED)]
    return paired_text(paired_difference(group, base, primary.name), primary)



def stopped_table(table: pd.DataFrame, space: SearchSpace, report: Report) -> None:
    final = final_rows(table)
    stopped = final[final["status"].isin([Status.STOPPED, Status.FAILED])]
    if stopped.empty:
        return
    params = [c for c in final.columns if c.startswith("param.")]
    spec = metric(space.primary.metric)
    headers = ["trial", "status", "seed", *[space.label_of(p) for p in params], "last epoch", spec.label]
    rows = [[r["trial_id"], r["status"], str(r["seed"]), *[fmt_setting(round_value(r[p])) for p in params],
             str(r["epoch"]),
             "-" if spec.name not in r or pd.isna(r[spec.name]) else fmt_metric(spec, pd.Series([r[spec.name]]))]
            for _, r in stopped.iterrows()]
    report.heading("Trials stopped early or failed")
    report.text("Not part of the means above: ASHA stopped these before the last epoch (or they failed).")
    report.table(Table("stopped", headers, rows))



def best_trials_table(space: SearchSpace, table: pd.DataFrame, report: Report, top: int = 10) -> None:
    """An Optuna search's best finished trials, under the reference rows (mean ± std over their seeds)."""
    done = completed_final(table)
    metric = space.primary.metric
    if done.empty or metric not in done:
        return
    refs = distinct_references(reference_rows(table))
    params = [c for c in done.columns if c.startswith("param.")]
    metrics = [m for m in METRICS if m.in_tables and m.name in done.columns]
    # One row per configuration: a seed-averaged trial's seeds are averaged (mean ± std), as Optuna saw them.
    configs = [group for _, group in done.groupby("tune_trial_id", sort=False)]
    sign = 1 if space.primary.mode == "min" else -1
    configs.sort(key=lambda g: (sign * g[metric].mean(), g["tune_trial_id"].iloc[0]))
    configs = configs[:top]
    headers = ["trial", *[space.label_of(p) for p in params], *[m.label for m in metrics]]
    rows = [[label, *["-" for _ in params], *cells] for label, _, cells in reference_cells(refs, metrics)]
    first_trial = len(rows)
    for group in configs:
        first = group.iloc[0]
        label = first["tune_trial_id"] + (f" ({len(group)} seeds)" if space.seed_averaged else "")
        rows.append([label, *[fmt_setting(round_value(first[p])) for p in params],
                     *[fmt_metric(m, group[m.name]) for m in metrics]])
    report.heading("Best trials")
    seeds = (f"mean ± std over each configuration's {space.seeds_per_trial} seeds, the objective the search "
             "optimised" if space.seed_averaged else "one seed each, so the order among close trials is not a finding")
    caption = ("Reference rows: the same evaluation of the untrained encoder (fine-tuning it is training from "
               f"scratch) and of raw pixels. Trials: final metrics of finished trials, best first ({seeds}).")
    evaluated, mismatch = evaluation_sets(pd.concat([pd.concat(configs), refs]))
    report.table(Table("best_trials", headers, rows, None, f"{caption} {evaluated}".strip() if first_trial else ""))
    if mismatch:
        report.text(mismatch)



# fANOVA on fewer trials ranks noise: with 4 noisy trials it printed 0.437 / 0.366 / 0.197 / 0.000.
MIN_IMPORTANCE_TRIALS = 10


def importance_table(space: SearchSpace, table: pd.DataFrame, report: Report) -> None:
    """fANOVA parameter importances (Optuna) on the finished trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done, basis = completed_final(table), "finished trials"
    metric = space.primary.metric
    if len(done) < MIN_IMPORTANCE_TRIALS:  # ASHA stopped most: compare every trial where all were measured
        done, rung = at_common_rung(table, metric)
        basis = f"trials at epoch {rung}, the last rung every trial reached"
    dims = {k: d for k, d in space.dimensions.items() if f"param.{k}" in done}
    report.heading("Parameter importances")
    if len(done) < MIN_IMPORTANCE_TRIALS or len(dims) < 2 or metric not in done:
        report.text(f"Too few trials to rank parameters: importances need at least {MIN_IMPORTANCE_TRIALS} "
                    f"trials measured at a common epoch (this search has {len(done)}) and 2 searched parameters.")
        return
    dists = {}
    for k, d in dims.items():
        if d.kind == "int":
            dists[k] = IntDistribution(*d.int)
        elif d.kind in ("uniform", "loguniform"):
            lo, hi = getattr(d, d.kind)
            dists[k] = FloatDistribution(lo, hi, log=d.kind == "loguniform")
        else:
            dists[k] = CategoricalDistribution(d.values)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if space.primary.mode == "max" else "minimize")
    for _, r in done.iterrows():
        params = {k: (int(r[f"param.{k}"]) if isinstance(dists[k], IntDistribution) else r[f"param.{k}"])
                  for k in dims}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    rows = [[k, f"{v:.3f}"] for k, v in sorted(importances.items(), key=lambda kv: (-round(kv[1], 3), kv[0]))]
    report.text(f"fANOVA (Optuna) on {len(done)} {basis}, objective {metric}.")
    report.table(Table("importances", ["parameter", "importance"], rows))



def pareto_table(space: SearchSpace, table: pd.DataFrame, report: Report) -> pd.DataFrame:
    done = completed_final(table)
    front = pareto_front(done, space.primary.metric, space.primary.mode)
    if front.empty:
        return front
    spec = metric(space.primary.metric)
    params = [c for c in front.columns if c.startswith("param.")]
    rows = [[r["trial_id"], f"{r['pretrain_time_s']:.1f}", fmt_metric(spec, pd.Series([r[spec.name]])),
             *[fmt_setting(round_value(r[p])) for p in params]] for _, r in front.iterrows()]
    report.heading("Accuracy vs pretraining time: Pareto front")
    headers = ["trial", "pretrain time (s)", spec.label, *[space.label_of(p) for p in params]]
    report.table(Table("pareto", headers, rows))
    return front
