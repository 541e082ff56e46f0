"""Ablation reports regenerated from recorded results, never from numbers typed by hand.

Input is a trials table -- read from a search's ``results.parquet`` or rebuilt
from its MLflow experiment; both give the same columns, so both give the same
report. The report is a list of blocks (headings, paragraphs, tables,
images) rendered to Markdown (``README.md``, tables GitHub renders), one
self-contained HTML file, and CSV per table. Every number is formatted from
the table; nothing depends on time or machine, so the Markdown is
byte-identical on a rerun.

Each report archives its input under ``<out>/data/`` (table, search space,
best reconstruction) so the command in its header regenerates it anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mae_search.metrics import BY_NAME, REGISTRY, Metric, from_mlflow_key, metric
from mae_search.record import (
    PARAM_PREFIX,
    TAG_BEST_RUN,
    TAG_KIND,
    TAG_REFERENCE,
    TAG_SEARCH,
    TAG_SEARCHED_PREFIX,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_TUNE_TRIAL,
    Status,
)
from mae_search.results import (
    RESULTS_FILE,
    SPACE_FILE,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_STOPPED,
    best_row,
    final_rows,
    read_table,
    reference_rows,
    results_file,
)
from mae_search.search_space import SearchSpace
from mae_search.storage import Location

GRID_FILE = "best_reconstruction.png"


class ReportError(ValueError):
    """The report cannot be built from what was given; one line."""


METRICS = REGISTRY
REFERENCE_LABELS = {"random_init": "random-init encoder (reference)", "raw_pixels": "raw pixels (reference)"}


# --------------------------------------------------------------------------- inputs


@dataclass
class SearchRecord:
    """One search's space and trials table (columns shared by the Parquet and MLflow sources)."""

    space: SearchSpace
    table: pd.DataFrame
    grid_png: bytes | None = None


def load_from_dir(path: str | Path | Location) -> SearchRecord:
    """A search directory (results.parquet + search_space.json), or a report's data/ archive; a local
    path or an object-store URI."""
    table_file = results_file(path)
    space_file = table_file.parent / SPACE_FILE
    if not table_file.is_file():
        raise ReportError(f"unknown search: no results table at {table_file}")
    if not space_file.is_file():
        raise ReportError(f"{space_file}: missing (the search's space is needed to lay out the report)")
    space = _read_space(space_file.read_text(), str(space_file))
    try:
        raw = read_table(table_file)
        table = normalise(raw)
    except Exception as exc:  # noqa: BLE001 - a damaged table is reported, not traced back
        raise ReportError(f"{table_file}: cannot read results table ({type(exc).__name__}: {exc})") from None
    grid = table_file.parent / GRID_FILE
    png = grid.read_bytes() if grid.is_file() else _best_grid_from_checkpoint(raw, space)
    return SearchRecord(space, table, png)


def _read_space(text: str, source: str) -> SearchSpace:
    from pydantic import ValidationError

    from mae_search.config import describe_validation_error

    try:
        return SearchSpace.model_validate_json(text)
    except ValidationError as exc:
        raise ReportError(describe_validation_error(exc, source)) from None


def _best_grid_from_checkpoint(table: pd.DataFrame, space: SearchSpace) -> bytes | None:
    best = best_row(completed_final(table), space.primary.metric, space.primary.mode)
    if best is None or "checkpoint_path" not in best or not best["checkpoint_path"]:
        return None
    png = Location.of(best["checkpoint_path"]) / GRID_FILE
    return png.read_bytes() if png.is_file() else None


def load_from_mlflow(experiment: str, tracking_uri: str) -> SearchRecord:
    """Rebuild the trials table from an MLflow experiment's parent and child runs."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"unknown search: no MLflow experiment '{experiment}' at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=10_000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "search"]
    if not parents:
        raise ReportError(f"MLflow experiment '{experiment}' holds no mae-search search")
    parent = parents[-1]
    with tempfile.TemporaryDirectory() as tmp:
        space_path = client.download_artifacts(parent.info.run_id, SPACE_FILE, tmp)
        space = _read_space(Path(space_path).read_text(), f"MLflow run {parent.info.run_id}")
    records = []
    for run in runs:
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        base = {"search": tags[TAG_SEARCH], "trial_id": tags[TAG_TRIAL_ID],
                "status": tags.get(TAG_STATUS, str(Status.RUNNING)), "reference": tags.get(TAG_REFERENCE, ""),
                "seed": int(tags.get(TAG_SEED, 0)), "tune_trial_id": tags.get(TAG_TUNE_TRIAL, "")}
        base.update({f"{PARAM_PREFIX}{k.removeprefix(TAG_SEARCHED_PREFIX)}": _parse(v) for k, v in tags.items()
                     if k.startswith(TAG_SEARCHED_PREFIX)})
        by_epoch: dict[int, dict[str, Any]] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                by_epoch.setdefault(m.step, {})[from_mlflow_key(key)] = m.value
        if not by_epoch:
            records.append({**base, "epoch": 0})
        for epoch, metrics in sorted(by_epoch.items()):
            records.append({**base, "epoch": epoch, **metrics})
    png = None
    best_run = parent.data.tags.get(TAG_BEST_RUN)
    if best_run:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = Path(client.download_artifacts(best_run, "reconstruction", tmp))
                last = sorted(folder.glob("*.png"))
                png = last[-1].read_bytes() if last else None
            except Exception:  # noqa: BLE001 - a report without the grid is still a report
                png = None
    return SearchRecord(space, normalise(pd.DataFrame.from_records(records)), png)


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the columns both sources share, in one order and dtype, sorted by trial and epoch."""
    params = sorted(c for c in df.columns if c.startswith("param."))
    metrics = [m.name for m in METRICS if m.name in df.columns]
    extra = [c for c in ("mask_ratio", "trial_time_s") if c in df.columns]
    cols = ["search", "trial_id", "tune_trial_id", "status", "reference", "seed", "epoch", *params, *metrics, *extra]
    out = df[[c for c in cols if c in df.columns]].copy()
    # The configuration a row belongs to: its Tune trial, shared by the seeds of a seed-averaged trial.
    tune_ids = out["tune_trial_id"].fillna("").astype(str) if "tune_trial_id" in out else out["trial_id"]
    out["tune_trial_id"] = tune_ids.where(tune_ids != "", out["trial_id"])
    if "reference" in out:
        out["reference"] = out["reference"].fillna("").astype(str)
    out["seed"] = out["seed"].astype(int)
    out["epoch"] = out["epoch"].astype(int)
    for c in metrics + extra:
        out[c] = out[c].astype(float)
    return out.sort_values(["search", "trial_id", "epoch"]).reset_index(drop=True)


def completed_final(table: pd.DataFrame) -> pd.DataFrame:
    final = final_rows(table)
    return final[final["status"] == STATUS_COMPLETED].reset_index(drop=True)


# --------------------------------------------------------------------------- blocks


@dataclass
class Table:
    name: str
    headers: list[str]
    rows: list[list[str]]
    bold_row: int | None = None
    caption: str = ""


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    vectors: dict[str, bytes] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.tables.append(table)
        self.blocks.append(("table", table))

    def image(self, name: str, figure: Figure | bytes, alt: str) -> None:
        """A figure (PNG + SVG), or a PNG that has no vector form (the reconstruction grid)."""
        self.images[name] = figure.png if isinstance(figure, Figure) else figure
        if isinstance(figure, Figure):
            self.vectors[name.removesuffix(".png") + ".svg"] = figure.svg
        self.blocks.append(("img", (name, alt)))


def fmt_setting(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value)


def fmt_metric(spec: Metric, values: pd.Series) -> str:
    v = values.dropna() * spec.scale
    if v.empty:
        return "-"
    if len(v) == 1:
        return f"{v.iloc[0]:.{spec.digits}f}"
    return f"{v.mean():.{spec.digits}f} ± {v.std(ddof=1):.{spec.digits}f}"


def factor_columns(space: SearchSpace, table: pd.DataFrame) -> list[str]:
    """Parameters that define a setting (the grid dimensions), as table columns."""
    if space.factor and f"param.{space.factor}" in table:
        return [f"param.{space.factor}"]
    return [f"param.{k}" for k in space.dimensions if f"param.{k}" in table]


def setting_label(row: pd.Series, cols: list[str]) -> str:
    if len(cols) == 1:
        return fmt_setting(row[cols[0]])
    return ", ".join(f"{c.removeprefix('param.').split('.')[-1]}={fmt_setting(row[c])}" for c in cols)


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[float, float, int] | None:
    """Mean of per-seed differences a - b with a 95% t-interval half-width; pairs matched on seed."""
    from scipy import stats

    merged = a[["seed", metric]].merge(b[["seed", metric]], on="seed", suffixes=("_a", "_b")).dropna()
    n = len(merged)
    if n == 0:
        return None
    diff = merged[f"{metric}_a"] - merged[f"{metric}_b"]
    half = float("nan") if n < 2 else float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    return float(diff.mean()), half, n


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
    done = final[final["status"] == STATUS_COMPLETED]
    primary = BY_NAME.get(space.primary.metric)
    metrics = [m for m in METRICS if m.in_tables and (m.name in done.columns or m.name in refs.columns)]
    declared = _expected_settings(space, cols)  # the file's order (original first, as written)
    settings = sorted({tuple(r) for r in final[cols].itertuples(index=False)},
                      key=lambda s: (declared.index(s), ()) if s in declared else (len(declared), _sort_key(s)))
    baseline = _baseline_setting(space, cols, settings)
    headers = [", ".join(space.label_of(c) for c in cols), "n", *[m.label for m in metrics]]
    with_delta = baseline is not None and primary is not None
    if with_delta:
        headers.append(f"Δ {primary.label} vs {fmt_setting(baseline[0])} (95% CI)")
    headers.append("stopped / failed")
    rows = [[label, str(len(group)), *cells, *(["-"] if with_delta else []), "-"]
            for label, group, cells in reference_cells(refs, metrics)]
    first_setting = len(rows)
    groups = []
    for setting in settings:
        mask = np.logical_and.reduce([final[c] == v for c, v in zip(cols, setting, strict=True)])
        group_all = final[mask]
        group = group_all[group_all["status"] == STATUS_COMPLETED]
        groups.append(group)
        label = setting_label(pd.Series(dict(zip(cols, setting, strict=True))), cols)
        row = [label + (" (baseline)" if baseline == setting else ""), str(len(group))]
        row += [fmt_metric(m, group[m.name]) if m.name in group else "-" for m in metrics]
        if with_delta:
            row.append(_delta_cell(final, cols, baseline, setting, group, primary))
        stopped = int((group_all["status"] == STATUS_STOPPED).sum())
        failed = int((group_all["status"] == STATUS_FAILED).sum())
        row.append(f"{stopped} / {failed}")
        rows.append(row)
    labels = [r[0] for r in rows[first_setting:]]
    best, verdict = separable_best(groups, labels, primary, space.primary.mode)
    caption = ("Final metrics of finished trials; mean ± std over seeds where n > 1. Reference rows: the same "
               "evaluation of each seed's untrained encoder (fine-tuning it is training from scratch) and of raw "
               "pixels. Bold: a best setting whose paired 95% interval against the runner-up excludes zero. "
               "Δ: paired by seed against the baseline, mean with 95% t-interval.")
    evaluated, mismatch = evaluation_sets(pd.concat([done, refs]))
    report.table(Table(name, headers, rows, None if best is None else first_setting + best,
                       f"{caption} {evaluated}".strip()))
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


def reference_cells(refs: pd.DataFrame, metrics: list[Metric]) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(label, rows, formatted metric cells) of each reference kind the table holds, in REFERENCE_LABELS order."""
    out = []
    for kind, label in REFERENCE_LABELS.items():
        group = refs[refs["reference"] == kind] if "reference" in refs else refs.iloc[0:0]
        if not group.empty:
            out.append((label, group, [fmt_metric(m, group[m.name]) if m.name in group else "-" for m in metrics]))
    return out


def _paired_text(diff: tuple[float, float, int] | None, spec: Metric) -> str:
    if diff is None:
        return "n/a"
    mean, half, n = diff
    ci = "" if math.isnan(half) else f" ± {half * spec.scale:.{spec.digits}f}"
    return f"{mean * spec.scale:+.{spec.digits}f}{ci} (n={n})"


def separable_best(groups: list[pd.DataFrame], labels: list[str], spec: Metric | None,
                   mode: str) -> tuple[int | None, str]:
    """Index of the best setting if its paired interval against the runner-up excludes zero, and the verdict."""
    if spec is None:
        return None, ""
    means = [g[spec.name].mean() if spec.name in g and not g.empty else float("nan") for g in groups]
    ranked = sorted((i for i, m in enumerate(means) if not math.isnan(m)),
                    key=lambda i: -means[i] if mode == "max" else means[i])
    if len(ranked) < 2:
        return (ranked[0] if ranked else None), ""
    best, runner = ranked[0], ranked[1]
    diff = paired_difference(groups[best], groups[runner], spec.name)
    delta = _paired_text(diff, spec)
    if diff is None or math.isnan(diff[1]) or abs(diff[0]) <= diff[1]:
        return None, (f"**Not separable at this n**: the best {spec.label}, {labels[best]}, and the runner-up, "
                      f"{labels[runner]}, differ by {delta}, an interval that includes zero; no row is marked best.")
    return best, f"Best {spec.label}: {labels[best]}, ahead of the runner-up {labels[runner]} by {delta}."


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
            cells = [f"{label} {_paired_text(paired_difference(g, ref, key), spec)}"
                     for label, g in zip(labels, groups, strict=True) if key in g and not g.empty]
            if cells:
                parts.append(f"{spec.label} minus {REFERENCE_LABELS[kind].removesuffix(' (reference)')}: "
                             + "; ".join(cells) + ".")
    return ("**Against the reference rows** (paired by seed, 95% t-interval): " + " ".join(parts)) if parts else ""


def _sort_key(setting: tuple) -> tuple:
    return tuple((0, float(v), "") if isinstance(v, int | float | np.number) else (1, 0.0, str(v)) for v in setting)


def _baseline_setting(space: SearchSpace, cols: list[str], settings: list[tuple]) -> tuple | None:
    if space.baseline is None or len(cols) != 1:
        return None
    for s in settings:
        if s[0] == space.baseline or fmt_setting(s[0]) == fmt_setting(space.baseline):
            return s
    return None


def _expected_settings(space: SearchSpace, cols: list[str]) -> list[tuple]:
    if len(cols) != 1 or not space.is_grid:
        return []
    dim = space.dimensions.get(cols[0].removeprefix("param."))
    return [(v,) for v in dim.values] if dim else []


def _delta_cell(final, cols, baseline, setting, group, primary: Metric) -> str:
    if setting == baseline:
        return "-"
    base_mask = final[cols[0]] == baseline[0]
    base = final[base_mask & (final["status"] == STATUS_COMPLETED)]
    return _paired_text(paired_difference(group, base, primary.name), primary)


def stopped_table(table: pd.DataFrame, space: SearchSpace, report: Report) -> None:
    final = final_rows(table)
    stopped = final[final["status"].isin([STATUS_STOPPED, STATUS_FAILED])]
    if stopped.empty:
        return
    params = [c for c in final.columns if c.startswith("param.")]
    spec = metric(space.primary.metric)
    headers = ["trial", "status", "seed", *[space.label_of(p) for p in params], "last epoch", spec.label]
    rows = [[r["trial_id"], r["status"], str(r["seed"]), *[fmt_setting(_round(r[p])) for p in params], str(r["epoch"]),
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
    refs = reference_rows(table)
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
        rows.append([label, *[fmt_setting(_round(first[p])) for p in params],
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


def _round(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float | np.floating) else v


def at_common_rung(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """Each completed or stopped trial's row at the latest epoch all of them reported ``metric`` at."""
    rows = table[table["status"].isin([STATUS_COMPLETED, STATUS_STOPPED])]
    if metric not in rows or rows.empty:
        return rows.iloc[0:0], 0
    rows = rows.dropna(subset=[metric])
    rung = int(rows.groupby("trial_id")["epoch"].max().min()) if not rows.empty else 0
    return rows[rows["epoch"] == rung].reset_index(drop=True), rung


def importance_table(space: SearchSpace, table: pd.DataFrame, report: Report) -> None:
    """fANOVA parameter importances (Optuna) on the finished trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done, basis = completed_final(table), "finished trials"
    metric = space.primary.metric
    if len(done) < 4:  # ASHA stopped most: compare every trial where all of them were measured
        done, rung = at_common_rung(table, metric)
        basis = f"trials at epoch {rung}, the last rung every trial reached"
    dims = {k: d for k, d in space.dimensions.items() if f"param.{k}" in done}
    if len(done) < 4 or len(dims) < 2 or metric not in done:
        report.text("Parameter importances need at least 4 trials measured at a common epoch and 2 searched "
                    "parameters.")
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
    report.heading("Parameter importances")
    report.text(f"fANOVA (Optuna) on {len(done)} {basis}, objective {metric}.")
    report.table(Table("importances", ["parameter", "importance"], rows))


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


def pareto_table(space: SearchSpace, table: pd.DataFrame, report: Report) -> pd.DataFrame:
    done = completed_final(table)
    front = pareto_front(done, space.primary.metric, space.primary.mode)
    if front.empty:
        return front
    spec = metric(space.primary.metric)
    params = [c for c in front.columns if c.startswith("param.")]
    rows = [[r["trial_id"], f"{r['pretrain_time_s']:.1f}", fmt_metric(spec, pd.Series([r[spec.name]])),
             *[fmt_setting(_round(r[p])) for p in params]] for _, r in front.iterrows()]
    report.heading("Accuracy vs pretraining time: Pareto front")
    headers = ["trial", "pretrain time (s)", spec.label, *[space.label_of(p) for p in params]]
    report.table(Table("pareto", headers, rows))
    return front


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Figure:
    """A plot as a paper needs it: a 300-dpi PNG (embedded in the HTML) and a vector SVG."""

    png: bytes
    svg: bytes


def _png(fig) -> Figure:
    """Render (reproducibly: no dates, fixed SVG ids) and close a matplotlib figure."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "mae-search"
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=300, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return Figure(png.getvalue(), svg.getvalue())


def plot_factor(space: SearchSpace, table: pd.DataFrame) -> Figure | None:
    cols = factor_columns(space, table)
    done = completed_final(table)
    spec = BY_NAME.get(space.primary.metric)
    if len(cols) != 1 or done.empty or spec is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = done.groupby(cols[0])[spec.name].agg(["mean", "std", "count"]).reset_index()
    declared = [v for (v,) in _expected_settings(space, cols)]
    grouped = grouped.sort_values(cols[0], key=lambda s: s.map(
        lambda v: (declared.index(v), ()) if v in declared else (len(declared), _sort_key((v,)))))
    x = [fmt_setting(v) for v in grouped[cols[0]]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar(x, grouped["mean"] * spec.scale, yerr=grouped["std"].fillna(0) * spec.scale, fmt="o-", capsize=4)
    ax.set_xlabel(space.label_of(cols[0]))
    ax.set_ylabel(spec.label)
    ax.set_title(f"{spec.label} vs {space.label_of(cols[0])} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_curves(space: SearchSpace, table: pd.DataFrame) -> Figure | None:
    """Per-trial curves of the objective (points joined across epochs without evaluation) and the
    training loss, with the reference rows' means as horizontal lines on the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = reference_rows(table)
    trials = table[table["status"] != str(Status.REFERENCE)] if "status" in table else table
    keys = [k for k in (space.primary.metric, "loss") if k in trials and trials[k].notna().any()]
    if not keys or trials.empty:
        return None
    from matplotlib.ticker import MaxNLocator

    params = [c for c in trials.columns if c.startswith("param.")]
    any_stopped = bool((trials["status"] == STATUS_STOPPED).any())
    # One colour and one legend entry per configuration; its seeds are lines of the same colour.
    configs = sorted({tuple(r) for r in trials[params].itertuples(index=False)}, key=_sort_key) if params else [()]
    colours = {c: f"C{i % 10}" for i, c in enumerate(configs)}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        labelled = set()
        for _, rows in trials.groupby("trial_id", sort=True):
            rows = rows.dropna(subset=[key])
            if rows.empty:
                continue
            config = tuple(rows.iloc[0][p] for p in params)
            label = ", ".join(f"{space.label_of(p)}={fmt_setting(_round(v))}" for p, v in zip(params, config,
                                                                                              strict=True))
            style = "--" if rows["status"].iloc[-1] == STATUS_STOPPED else "-"
            ax.plot(rows["epoch"], rows[key] * metric(key).scale, style, marker=".", alpha=0.8,
                    color=colours.get(config, "C0"), label=None if config in labelled else (label or "base"))
            labelled.add(config)
        if key == space.primary.metric and "reference" in refs:
            for (kind, group), color in zip(refs.groupby("reference", sort=True), ("0.3", "0.6"), strict=False):
                if key in group and group[key].notna().any():
                    ax.axhline(group[key].mean() * metric(key).scale, color=color, linestyle=":",
                               label=REFERENCE_LABELS[kind])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric(key).label.removesuffix(" (last epoch)"))
        ax.grid(alpha=0.3)
    notes = (["dashed: stopped by ASHA"] if any_stopped else []) + (["dotted: references"] if not refs.empty else [])
    axes[0][0].set_title("learning curves" + (f" ({'; '.join(notes)})" if notes else ""))
    if len(configs) <= 12:
        axes[0][0].legend(fontsize=6, loc="best")
    return _png(fig)


def plot_pareto(space: SearchSpace, table: pd.DataFrame, front: pd.DataFrame) -> Figure | None:
    done = completed_final(table)
    spec = metric(space.primary.metric)
    if done.empty or "pretrain_time_s" not in done or spec.name not in done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.scatter(done["pretrain_time_s"], done[spec.name] * spec.scale, alpha=0.6, label="trials")
    if not front.empty:
        ax.plot(front["pretrain_time_s"], front[spec.name] * spec.scale, "r-o", label="Pareto front")
    ax.set_xlabel(BY_NAME["pretrain_time_s"].label)
    ax.set_ylabel(spec.label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------- assembly


def build_report(records: list[SearchRecord], command: str) -> Report:
    if not records:
        raise ReportError("no search to report on")
    space = records[0].space
    table = pd.concat([r.table for r in records], ignore_index=True)
    names = sorted(table["search"].unique()) if not table.empty else [space.name]
    report = Report(title=f"Report: {', '.join(names)}")
    report.text(f"Regenerate with `{command}` (generated from recorded results only).")
    if space.description:
        report.text(space.description)
    final = final_rows(table) if not table.empty else table
    # Counted per configuration (the seeds of a seed-averaged trial end together).
    counts = final.groupby("tune_trial_id")["status"].first().value_counts().to_dict() if not final.empty else {}
    expected = sum(r.space.total_trials() for r in records)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
    recorded = final["tune_trial_id"].nunique() if not final.empty else 0
    each = f" x {space.seeds_per_trial} seeds" if space.seed_averaged else ""
    report.text(f"Trials recorded: {recorded} of {expected} planned{each} ({summary}). "
                f"Objective: {space.primary.mode} {space.primary.metric}.")
    if final.empty or not (final["status"] == STATUS_COMPLETED).any():
        report.text("**No trial has finished yet**: tables below will fill in as trials complete.")
    if space.is_grid:
        ablation_tables(space, table, report)
        png = plot_factor(space, table)
        if png:
            report.image("factor.png", png, "metric vs ablated factor")
    else:
        best_trials_table(space, table, report)
        importance_table(space, table, report)
    front = pareto_table(space, table, report)
    png = plot_pareto(space, table, front)
    if png is not None and not front.empty:
        report.image("pareto.png", png, "Pareto front: accuracy vs pretraining time")
    stopped_table(table, space, report)
    curves = plot_curves(space, table)
    if curves:
        report.heading("Learning curves")
        report.image("curves.png", curves, "learning curves")
    grid = next((r.grid_png for r in records if r.grid_png), None)
    if grid:
        report.heading("Best trial: reconstructions")
        report.text("Columns: original | masked | reconstruction | reconstruction with visible patches.")
        report.image(GRID_FILE, grid, "best trial reconstructions")
    return report


def render_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    for kind, payload in report.blocks:
        if kind == "h2":
            out += [f"## {payload}", ""]
        elif kind == "p":
            out += [payload, ""]
        elif kind == "img":
            name, alt = payload
            out += [f"![{alt}]({name})", ""]
        else:
            out += [*_markdown_table(payload), ""]
    return "\n".join(out).rstrip() + "\n"


def _markdown_table(t: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |", "|" + "|".join("---" for _ in t.headers) + "|"]
    for i, row in enumerate(t.rows):
        cells = [f"**{cell(c)}**" if i == t.bold_row else cell(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return lines


def render_html(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:first-child{text-align:left}.best td{font-weight:bold}img{max-width:100%;height:auto}</style>"
             "</head><body>",
             f"<h1>{html.escape(report.title)}</h1>"]
    for kind, payload in report.blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(payload)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{_inline(payload)}</p>")
        elif kind == "img":
            name, alt = payload
            png = report.images[name]
            data = base64.b64encode(png).decode()
            width = int.from_bytes(png[16:20], "big")  # IHDR: shown at 100 dpi, so a 300-dpi plot stays sharp
            shown = width // 3 if name != GRID_FILE else width
            parts.append(f"<img alt='{html.escape(alt)}' style='width:{shown}px' src='data:image/png;base64,{data}'>")
        else:
            t: Table = payload
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr>")
            for i, row in enumerate(t.rows):
                cls = " class='best'" if i == t.bold_row else ""
                parts.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
            if t.caption:
                parts.append(f"<p><em>{html.escape(t.caption)}</em></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(text: str) -> str:
    out = "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "-")


def render_latex(t: Table) -> str:
    """A booktabs table to \\input{} into a paper (needs \\usepackage{booktabs}); the best row in bold."""
    lines = [r"\begin{tabular}{l" + "r" * (len(t.headers) - 1) + "}", r"\toprule",
             " & ".join(_latex(h) for h in t.headers) + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        cells = [_latex(c) for c in row]
        if i == t.bold_row:
            cells = [r"\textbf{" + c + "}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.caption:
        lines.insert(0, "% " + t.caption.replace("\n", " "))
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """The little Markdown the report's paragraphs use: **bold** and `code`."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def write_report(records: list[SearchRecord], out: str | Path, command: str) -> Path:
    """Write README.md, report.html, tables/*.csv, plots and the data/ archive under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(records) == 1:
        archive(records[0], out / "data")
    report = build_report(records, command)
    (out / "README.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report))
    tables = out / "tables"
    if tables.exists():
        shutil.rmtree(tables)
    tables.mkdir()
    for t in report.tables:
        pd.DataFrame(t.rows, columns=t.headers).to_csv(tables / f"{t.name}.csv", index=False)
        (tables / f"{t.name}.tex").write_text(render_latex(t))
    for name, data in {**report.images, **report.vectors}.items():
        (out / name).write_bytes(data)
    return out / "README.md"


def archive(record: SearchRecord, data_dir: Path) -> None:
    """Copy the report's input beside it, so the header's command regenerates it from a clean clone."""
    data_dir.mkdir(parents=True, exist_ok=True)
    record.table.to_parquet(data_dir / RESULTS_FILE, index=False)
    (data_dir / SPACE_FILE).write_text(record.space.model_dump_json(indent=2) + "\n")
    if record.grid_png:
        (data_dir / GRID_FILE).write_bytes(record.grid_png)
