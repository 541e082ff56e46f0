"""How a report names and formats what it shows: metrics, reference rows, settings and values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mae_search.metrics import REGISTRY, Metric, test_name
from mae_search.search.space import SearchSpace

# The report's column order: each validation metric right after its test metric (LP, val LP, FT, ...).
METRICS = tuple(sorted(REGISTRY, key=lambda m: [n.name for n in REGISTRY].index(test_name(m.name))))


REFERENCE_LABELS = {"random_init": "random-init encoder (reference)", "raw_pixels": "raw pixels (reference)"}



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



def sort_key(setting: tuple) -> tuple:
    return tuple((0, float(v), "") if isinstance(v, int | float | np.number) else (1, 0.0, str(v)) for v in setting)



def expected_settings(space: SearchSpace, cols: list[str]) -> list[tuple]:
    if len(cols) != 1 or not space.is_grid:
        return []
    dim = space.dimensions.get(cols[0].removeprefix("param."))
    return [(v,) for v in dim.values] if dim else []



def round_value(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float | np.floating) else v
