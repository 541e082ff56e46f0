"""Which row a report crowns, from hand-built results tables read through ``mae-search report``.

Planted paired differences vary from seed to seed, so the t-quantile and the variance of the
differences take part in every verdict; the expected intervals are worked out by hand in comments.
"""

from pathlib import Path

import pandas as pd
from scipy import stats

from tests.conftest import cli
from tests.test_report import new_search

SPACE = """
name: NAME
base: {epochs: 2}
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75, 0.9]}
factor: masking.mask_ratio
seeds: [0, 1, 2, 3]
metric: linear_probe_acc
select_on: test
mode: max
"""


def planted(tmp_path: Path, accs: dict[float, dict[int, float]], name: str = "crown",
            status: dict[float, str] | None = None, refs: dict[int, float] | None = None) -> Path:
    """A search directory whose results table holds the given final LP accuracies (setting -> seed -> acc)."""
    _, _, search_dir = new_search(tmp_path / name, SPACE.replace("NAME", name))
    rows = []
    for ratio, by_seed in accs.items():
        for seed, acc in by_seed.items():
            rows.append({"search": name, "trial_id": f"r{ratio}_s{seed}", "seed": seed,
                         "status": (status or {}).get(ratio, "completed"), "epoch": 2,
                         "param.masking.mask_ratio": ratio, "linear_probe_acc": acc, "reference": None})
    for seed, acc in (refs or {}).items():
        for kind, offset in (("random_init", 0.0), ("raw_pixels", -0.02)):
            rows.append({"search": name, "trial_id": f"{kind}_s{seed}", "status": "reference", "seed": seed,
                         "epoch": 0, "param.masking.mask_ratio": None, "linear_probe_acc": acc + offset,
                         "reference": kind})
    pd.DataFrame.from_records(rows).to_parquet(search_dir / "results.parquet", index=False)
    return search_dir


def report(tmp_path: Path, *search_dirs: Path) -> str:
    out = tmp_path / "out"
    cli("report", *map(str, search_dirs), "--out", str(out))
    return (out / "README.md").read_text()


def bold_rows(md: str) -> list[str]:
    return [line.split(" | ")[0].strip("| *") for line in md.splitlines() if line.startswith("| **")]


def test_a_setting_behind_on_every_shared_seed_is_not_crowned_by_an_extra_lucky_seed(tmp_path):
    # 0.5 is 5.0, 4.8 and 5.2 points behind 0.75 on the shared seeds 0-2, but its extra seed 3 (90 %)
    # lifts its unpaired mean (52.5 %) over 0.75's (45.0 %).
    lucky = {0: 0.40, 1: 0.402, 2: 0.398, 3: 0.90}
    md = report(tmp_path, planted(tmp_path, {0.5: lucky, 0.75: {0: 0.45, 1: 0.45, 2: 0.45}}))
    # 0.75 - 0.5 on seeds 0-2: 5.0, 4.8, 5.2 -> mean 5.0, sd 0.2, t(0.975, 2) = 4.303: 4.303 * 0.2 / sqrt(3) = 0.50.
    assert bold_rows(md) == ["0.75"]
    assert "Best LP top-1 (%): 0.75, ahead of every other setting on paired 95% intervals (0.5 +5.0 ± 0.5 (n=3))." in md
    assert "by -" not in md


def test_the_only_finished_setting_is_not_crowned(tmp_path):
    accs = {0.5: {0: 0.40, 1: 0.43}, 0.75: {0: 0.30, 1: 0.31}}
    md = report(tmp_path, planted(tmp_path, accs, status={0.75: "stopped_early"}))
    assert bold_rows(md) == []
    assert "Only 0.5 has finished trials: there is nothing to compare it with, so no row is marked best." in md


def test_every_other_setting_is_tested_not_only_the_runner_up(tmp_path):
    best = {0: 0.50, 1: 0.52, 2: 0.51, 3: 0.53}
    runner_up = {0: 0.45, 1: 0.466, 2: 0.462, 3: 0.47}  # behind by 5.0, 5.4, 4.8, 6.0: separated
    noisy = {0: 0.60, 1: 0.30, 2: 0.61, 3: 0.35}  # 0.5 - 0.9: -10, +22, -10, +18: mean +5, not separated
    md = report(tmp_path, planted(tmp_path, {0.5: best, 0.75: runner_up, 0.9: noisy}))
    assert bold_rows(md) == []
    diffs = [100 * (best[s] - noisy[s]) for s in range(4)]
    half = stats.t.ppf(0.975, 3) * pd.Series(diffs).std() / 2  # 3.182 * 17.09 / 2 = 27.2
    assert f"cannot be separated from 0.9 (paired differences, 95% t-interval: 0.9 +5.0 ± {half:.1f} (n=4))" in md
    assert "separated from 0.75" not in md and "0.9 and 0.75" not in md


def test_combined_searches_pair_within_each_search_and_count_references_once(tmp_path):
    a = {0.5: {0: 0.50, 1: 0.52}, 0.75: {0: 0.45, 1: 0.46}}
    b = {0.5: {0: 0.55, 1: 0.50}, 0.75: {0: 0.49, 1: 0.47}}
    refs = {0: 0.20, 1: 0.21}
    md = report(tmp_path, planted(tmp_path, a, "first", refs=refs), planted(tmp_path, b, "second", refs=refs))
    # Four pairs (two seeds in each search), not eight: differences 5, 6, 6, 3 -> mean 5.0, sd 1.41,
    # t(0.975, 3) = 3.182: 3.182 * 1.414 / 2 = 2.25.
    diffs = [100 * (x[0.5][s] - x[0.75][s]) for x in (a, b) for s in (0, 1)]
    half = stats.t.ppf(0.975, 3) * pd.Series(diffs).std() / 2
    assert f"(0.75 +5.0 ± {half:.1f} (n=4))" in md
    assert bold_rows(md) == ["0.5"]
    rows = {line.split(" | ")[0].strip("| *"): line.split(" | ") for line in md.splitlines() if " | " in line}
    assert rows["random-init encoder (reference)"][1] == "2"  # the same two runs, recorded by both searches
    assert rows["0.5"][1] == "4"


def test_only_the_metric_cells_of_the_best_row_are_bold(tmp_path):
    accs = {0.5: {0: 0.50, 1: 0.52, 2: 0.51}, 0.75: {0: 0.40, 1: 0.43, 2: 0.42}}
    search_dir = planted(tmp_path, accs)
    table = pd.read_parquet(search_dir / "results.parquet")
    table["pretrain_time_s"] = 10.0 + table["seed"]
    table.to_parquet(search_dir / "results.parquet", index=False)
    md = report(tmp_path, search_dir)
    best = next(line for line in md.splitlines() if line.startswith("| **0.5**"))
    cells = best.strip("|").split(" | ")
    assert cells[1].strip() == "3" and cells[2].strip() == "**51.0 ± 1.0**" and cells[3].strip() == "11.0 ± 1.0"


def test_a_search_selected_on_validation_crowns_on_it_and_shows_both_splits(tmp_path):
    # 0.5 leads on the validation split (what the search selected on), 0.75 on test: the bold row follows
    # validation, and the test numbers stand beside it.
    search_dir = planted(tmp_path, {0.5: {0: 0.40, 1: 0.41, 2: 0.43}, 0.75: {0: 0.50, 1: 0.52, 2: 0.51}})
    (search_dir / "search_space.json").write_text((search_dir / "search_space.json").read_text().replace(
        '"metric":"linear_probe_acc"', '"metric":"val_linear_probe_acc"').replace(
        '"select_on":"test"', '"select_on":"val"'))
    table = pd.read_parquet(search_dir / "results.parquet")
    table["val_linear_probe_acc"] = table["linear_probe_acc"].where(table["param.masking.mask_ratio"] == 0.75,
                                                                    table["linear_probe_acc"] + 0.2)
    table["eval_val_images"] = 200.0
    table.to_parquet(search_dir / "results.parquet", index=False)
    md = report(tmp_path, search_dir)
    assert ("Selected on the validation split (200 images carved from the labelled training images): val LP "
            "top-1 (%). Test numbers are measured at each trial's last epoch only, never seen by Optuna or ASHA") in md
    assert "| mask ratio | n | LP top-1 (%) | val LP top-1 (%) |" in md
    assert bold_rows(md) == ["0.5"] and "Best val LP top-1 (%): 0.5" in md
    assert "| **0.5** | 3 | **41.3 ± 1.5** | **61.3 ± 1.5** |" in md
