"""The report's figures: metric vs the ablated factor, learning curves, and the Pareto front; each a 300-dpi
PNG (embedded in the HTML) and a vector SVG, rendered reproducibly."""

from __future__ import annotations

import pandas as pd

from mae_search.metrics import BY_NAME, metric
from mae_search.report.labels import (
    REFERENCE_LABELS,
    expected_settings,
    factor_columns,
    fmt_setting,
    round_value,
    sort_key,
)
from mae_search.report.load import (
    completed_final,
)
from mae_search.report.render import (
    Figure,
)
from mae_search.search.record import Status
from mae_search.search.results import reference_rows
from mae_search.search.space import SearchSpace


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
    declared = [v for (v,) in expected_settings(space, cols)]
    grouped = grouped.sort_values(cols[0], key=lambda s: s.map(
        lambda v: (declared.index(v), ()) if v in declared else (len(declared), sort_key((v,)))))
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
    any_stopped = bool((trials["status"] == Status.STOPPED).any())
    # One colour and one legend entry per configuration; its seeds are lines of the same colour.
    configs = sorted({tuple(r) for r in trials[params].itertuples(index=False)}, key=sort_key) if params else [()]
    colours = {c: f"C{i % 10}" for i, c in enumerate(configs)}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        labelled = set()
        for _, rows in trials.groupby("trial_id", sort=True):
            rows = rows.dropna(subset=[key])
            if rows.empty:
                continue
            config = tuple(rows.iloc[0][p] for p in params)
            label = ", ".join(f"{space.label_of(p)}={fmt_setting(round_value(v))}" for p, v in zip(params, config,
                                                                                              strict=True))
            style = "--" if rows["status"].iloc[-1] == Status.STOPPED else "-"
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
