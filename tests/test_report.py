"""Report generation from recorded results built here through the real results/MLflow callbacks."""

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from mae_search.config import TrainConfig
from mae_search.report.build import write_report
from mae_search.report.load import ReportError, load_from_dir, load_from_mlflow
from mae_search.report.stats import pareto_front
from mae_search.search.mlflow_runs import MLflowSearchCallback
from mae_search.search.results import record_references
from mae_search.search.results_callback import ResultsTableCallback
from mae_search.search.space import load_search_space
from tests.conftest import cli

SPACE_TEMPLATE = """
name: fixture-ablation
description: Synthetic recorded results.
base: {epochs: 3}
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75, 0.9]}
factor: masking.mask_ratio
baseline: 0.75
seeds: SEEDS
metric: linear_probe_acc
select_on: test
mode: max
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
"""
SPACE = SPACE_TEMPLATE.replace("SEEDS", "[0, 1]")
ACC = {0.5: 0.40, 0.75: 0.50, 0.9: 0.45}


class FakeTrial:
    def __init__(self, trial_id, config, status="TERMINATED"):
        self.trial_id, self.config, self.status, self.error_file = trial_id, config, status, None


def new_search(tmp_path: Path, text: str):
    """A search space file and the directory a search of it records into, as `mae-search search` lays it out."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    space = load_search_space(space_file)
    search_dir = tmp_path / "results" / space.name
    search_dir.mkdir(parents=True)
    (search_dir / "search_space.json").write_text(space.model_dump_json())
    return space, space_file, search_dir


def record(tmp_path: Path, with_mlflow: bool = True, drop: set[str] = frozenset(), seeds: tuple = (0, 1),
           counts: dict[str, float] | None = None, ref_counts: dict[str, float] | None = None):
    """Feed synthetic per-epoch results (and reference rows) through the callbacks a real search uses;
    ``counts``/``ref_counts``: the evaluation set sizes the trials' last epochs and the references report."""
    space, space_file, search_dir = new_search(tmp_path, SPACE_TEMPLATE.replace("SEEDS", str(list(seeds))))
    record_references(search_dir, [
        (kind, TrainConfig(seed=seed), {"linear_probe_acc": acc + 0.01 * seed, "knn_acc": acc,
                                        **(ref_counts or counts or {})})
        for seed in seeds for kind, acc in (("random_init", 0.2), ("raw_pixels", 0.15))])
    callbacks = [ResultsTableCallback(search_dir, 3, space)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if with_mlflow:
        callbacks.append(MLflowSearchCallback(uri, space, search_dir, space_file, max_epochs=3))
    for cb in callbacks:
        cb.setup()
    trials = []
    for i, (ratio, seed) in enumerate((r, s) for s in seeds for r in (0.5, 0.75, 0.9)):
        trial = FakeTrial(f"t{i}", {"masking.mask_ratio": ratio, "seed": seed})
        if trial.trial_id in drop:
            continue
        trials.append(trial)
        last_epoch = 1 if (ratio, seed) == (0.9, 1) else 3  # ASHA stops this one
        for cb in callbacks:
            cb.on_trial_start(0, [], trial) if hasattr(cb, "on_trial_start") else None
        for epoch in range(1, last_epoch + 1):
            acc = (ACC[ratio] + 0.01 * seed) * epoch / 3
            result = {"epoch": epoch, "training_iteration": epoch, "config": trial.config,
                      "linear_probe_acc": acc, "knn_acc": acc - 0.05, "mse": 1.0 - acc, "loss": 1.0 - acc,
                      "psnr": 10 + 10 * acc, "masked_hf_error": 0.3 - acc / 10, "mask_ratio": ratio,
                      "pretrain_time_s": 10.0 * epoch * (1 - ratio) + seed, "throughput_img_s": 100.0 / (1 - ratio),
                      "time_total_s": 20.0 * epoch, **(counts if counts and epoch == last_epoch else {})}
            for cb in callbacks:
                cb.on_trial_result(0, [], trial, result)
        for cb in callbacks:
            cb.on_trial_complete(0, [], trial)
    for cb in callbacks:
        cb.on_experiment_end(trials)
    return search_dir, uri


def ablation_rows(md: str) -> dict[str, list[str]]:
    section = md.split("## Ablation")[1].split("\n\n")[1]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines()[2:]]
    return {r[0].strip("*"): [c.strip("*") for c in r] for r in rows}


def test_ablation_table_means_best_and_stopped(tmp_path):
    search_dir, _ = record(tmp_path, with_mlflow=False)
    readme = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd")
    md = readme.read_text()
    rows = ablation_rows(md)
    # mean ± std over seeds, n counts finished trials only (0.9 / seed 1 was stopped by ASHA).
    assert rows["0.5"][1:3] == ["2", "40.5 ± 0.7"]
    assert rows["0.75 (baseline)"][1:3] == ["2", "50.5 ± 0.7"]
    assert rows["0.9"][1:3] == ["1", "45.0"]
    assert rows["0.9"][-1] == "1 / 0"
    # The reference rows come first, evaluated per seed.
    assert rows["random-init encoder (reference)"][1:3] == ["2", "20.5 ± 0.7"]
    assert rows["raw pixels (reference)"][1:3] == ["2", "15.5 ± 0.7"]
    assert "LP top-1 (%) minus random-init encoder: 0.5 +20.0 ± 0.0 (n=2); 0.75 (baseline) +30.0 ± 0.0 (n=2)" in md
    # The runner-up (0.9) has one finished seed, so no interval: no row is marked best.
    assert not [line for line in md.splitlines() if line.startswith("| **")]
    assert ("**Not separable at this n**: the highest mean LP top-1 (%), 0.75 (baseline), cannot be separated "
            "from 0.9 (paired differences, 95% t-interval: 0.9 +5.0 (n=1)); no row is marked best.") in md
    # Paired difference vs baseline: -10 points for both seeds, so a zero-width interval.
    assert rows["0.5"][-2] == "-10.0 ± 0.0 (n=2)"
    assert "## Trials stopped early or failed" in md and "| t5 | stopped_early | 1 | 0.9 | 1 |" in md
    csv = pd.read_csv(tmp_path / "out" / "tables" / "ablation.csv")
    assert csv.shape[0] == 5  # two reference rows, three settings
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "src='factor.png'" not in html


def test_the_table_says_which_labelled_images_its_numbers_come_from(tmp_path):
    full = {"eval_train_images": 8000.0, "eval_test_images": 1000.0}
    search_dir, _ = record(tmp_path / "same", with_mlflow=False, counts=full)
    md = write_report([load_from_dir(search_dir)], tmp_path / "same" / "out", "cmd").read_text()
    assert "Probe and k-NN on 8,000 labelled training and 1,000 test images." in md and "Not comparable" not in md
    # References evaluated on a subset while the trials' last epochs used the full set: said, not hidden.
    subset = {"eval_train_images": 1000.0, "eval_test_images": 1000.0}
    search_dir, _ = record(tmp_path / "mixed", with_mlflow=False, counts=full, ref_counts=subset)
    md = write_report([load_from_dir(search_dir)], tmp_path / "mixed" / "out", "cmd").read_text()
    assert "**Not comparable**: these rows' probe and k-NN numbers come from different labelled sets (train / " \
           "test images: 1,000 / 1,000; 8,000 / 1,000)." in md
    assert "Probe and k-NN on" not in md


def test_best_is_bold_only_when_separated_from_every_other_setting(tmp_path):
    # Three seeds: 0.9 seeds 0 and 2 finish, 5 points behind 0.75 on both, so the interval excludes zero.
    search_dir, _ = record(tmp_path, with_mlflow=False, seeds=(0, 1, 2))
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    bold = [line for line in md.splitlines() if line.startswith("| **")]
    assert len(bold) == 1 and bold[0].startswith("| **0.75 (baseline)**")
    assert ("Best LP top-1 (%): 0.75 (baseline), ahead of every other setting on paired 95% intervals "
            "(0.9 +5.0 ± 0.0 (n=2); 0.5 +10.0 ± 0.0 (n=3)).") in md


def test_rerun_is_byte_identical_and_regenerates_from_archive(tmp_path):
    search_dir, _ = record(tmp_path, with_mlflow=False)
    first = write_report([load_from_dir(search_dir)], tmp_path / "a", "cmd").read_bytes()
    second = write_report([load_from_dir(search_dir)], tmp_path / "b", "cmd").read_bytes()
    assert first == second
    again = write_report([load_from_dir(tmp_path / "a" / "data")], tmp_path / "c", "cmd").read_bytes()
    assert again == first


def test_mlflow_and_parquet_give_the_same_tables(tmp_path):
    search_dir, uri = record(tmp_path)
    from_parquet = write_report([load_from_dir(search_dir)], tmp_path / "p", "cmd")
    from_mlflow = write_report([load_from_mlflow("fixture-ablation", uri)], tmp_path / "m", "cmd")
    assert from_parquet.read_text() == from_mlflow.read_text()
    for csv in (tmp_path / "p" / "tables").glob("*.csv"):
        assert csv.read_text() == (tmp_path / "m" / "tables" / csv.name).read_text()


def test_partial_search_says_what_is_missing(tmp_path):
    search_dir, _ = record(tmp_path, with_mlflow=False, drop={"t2", "t5"})  # no 0.9 at all
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    assert "Trials recorded: 4 of 6 planned" in md
    assert "**Missing**: no finished trial yet for 0.9." in md


def test_unknown_search_and_broken_input(tmp_path):
    with pytest.raises(ReportError, match="unknown search: no results table"):
        load_from_dir(tmp_path / "nope")
    out = cli("report", str(tmp_path / "nope"), check=False)
    assert out.returncode == 2 and "unknown search" in out.stdout
    search_dir, _ = record(tmp_path, with_mlflow=False)
    (search_dir / "results.parquet").write_bytes(b"garbage")
    with pytest.raises(ReportError, match="cannot read results table"):
        load_from_dir(search_dir)


def test_pareto_front_keeps_non_dominated_trials():
    done = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "acc": [0.5, 0.6, 0.4, 0.6],
                         "pretrain_time_s": [10.0, 20.0, 15.0, 30.0]})
    assert pareto_front(done, "acc", "max")["trial_id"].tolist() == ["a", "b"]


def test_combined_searches_pool_their_trials(tmp_path):
    a_dir, _ = record(tmp_path / "a", with_mlflow=False, drop={"t3", "t4", "t5"})  # seed 0 only
    b_dir, _ = record(tmp_path / "b", with_mlflow=False, drop={"t0", "t1", "t2"})  # seed 1 only
    records = [load_from_dir(a_dir), load_from_dir(b_dir)]
    for r, prefix in zip(records, ("a", "b"), strict=True):  # distinct trial ids, as distinct searches have
        r.table["trial_id"] = prefix + r.table["trial_id"]
    md = write_report(records, tmp_path / "out", "cmd").read_text()
    assert ablation_rows(md)["0.5"][1:3] == ["2", "40.5 ± 0.7"]


COMMITTED = sorted(p for p in (Path(__file__).parent.parent / "reports").glob("*/README.md"))


@pytest.mark.parametrize("readme", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_report_regenerates_identically(tmp_path, readme):
    command = re.search(r"Regenerate with `([^`]+)`", readme.read_text()).group(1)
    args = shlex.split(command)
    assert args[:2] == ["mae-search", "report"]
    out_index = args.index("--out")
    root = readme.parent.parent.parent
    args[out_index + 1] = str(tmp_path / "out")
    cli(*args[1:], cwd=root)
    regenerated = (tmp_path / "out" / "README.md").read_text()
    # Only the header line names the output location; everything else must match byte for byte.
    assert regenerated.replace(str(tmp_path / "out"), args_out(command)) == readme.read_text()


def args_out(command: str) -> str:
    args = shlex.split(command)
    return args[args.index("--out") + 1]


OPTUNA_SPACE = """
name: fixture-joint
base: {epochs: 2}
dimensions:
  masking.mask_ratio: {uniform: [0.5, 0.9]}
  loss.freq_weight: {uniform: [0.0, 0.2]}
metric: linear_probe_acc
select_on: test
mode: max
num_samples: 8
"""


def test_optuna_search_report_best_trials_importances_pareto(tmp_path):
    space, _, search_dir = new_search(tmp_path, OPTUNA_SPACE)
    record_references(search_dir, [("random_init", TrainConfig(), {"linear_probe_acc": 0.1}),
                                               ("raw_pixels", TrainConfig(), {"linear_probe_acc": 0.2})])
    cb = ResultsTableCallback(search_dir, 2, space)
    cb.setup()
    # Accuracy depends on mask ratio only, so fANOVA must rank it first.
    for i in range(12):
        ratio, freq = 0.5 + 0.03 * i, 0.2 * ((i * 5) % 12) / 12
        trial = FakeTrial(f"j{i}", {"masking.mask_ratio": ratio, "loss.freq_weight": freq, "seed": 0})
        for epoch in (1, 2):
            acc = ratio * epoch / 2
            cb.on_trial_result(0, [], trial, {"epoch": epoch, "training_iteration": epoch, "config": trial.config,
                                              "linear_probe_acc": acc, "pretrain_time_s": 10 * ratio * epoch})
        cb.on_trial_complete(0, [], trial)
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    rows = md.split("## Best trials")[1].split("\n\n")[1].splitlines()[2:]
    assert rows[0].startswith("| random-init encoder (reference) | - | - | 10.0 |")
    assert rows[1].startswith("| raw pixels (reference) | - | - | 20.0 |")
    assert rows[2].startswith("| j11 |")  # the best trial first; one seed each, so not marked
    # The report opens with the verdict: every trial beats both references, the best four named.
    assert md.split("\n\n")[1] == (
        "**Verdict** (test split): 12 of 12 finished settings beat the random-init encoder and raw pixels on LP "
        "top-1 (points, paired by seed): j11 +73.0 (n=1) over random-init encoder, +63.0 (n=1) over raw pixels; "
        "j10 +70.0 (n=1) over random-init encoder, +60.0 (n=1) over raw pixels; j9 +67.0 (n=1) over random-init "
        "encoder, +57.0 (n=1) over raw pixels; j8 +64.0 (n=1) over random-init encoder, +54.0 (n=1) over raw "
        "pixels and 8 more.")
    importances = md.split("## Parameter importances")[1].split("\n\n")[2].splitlines()
    assert importances[2].startswith("| masking.mask_ratio |")
    # Higher mask ratio is both more accurate and slower here, so every trial is on the front.
    pareto = md.split("## Accuracy vs pretraining time: Pareto front")[1].split("\n\n")[1].splitlines()[2:]
    assert len(pareto) == 12
    assert (tmp_path / "out" / "pareto.png").is_file()


DECODER_SPACE = """
name: fixture-decoder
base: {epochs: 1}
dimensions:
  model.decoder_depth: {grid: [1, 2]}
  model.decoder_embed_dim: {grid: [16, 32]}
metric: linear_probe_acc
select_on: test
mode: max
scheduler: {type: none}
"""


def test_multi_factor_grid_gets_one_table_per_factor(tmp_path):
    space, _, search_dir = new_search(tmp_path, DECODER_SPACE)
    cb = ResultsTableCallback(search_dir, 1, space)
    cb.setup()
    for i, (depth, width) in enumerate((d, w) for d in (1, 2) for w in (16, 32)):
        trial = FakeTrial(f"d{i}", {"model.decoder_depth": depth, "model.decoder_embed_dim": width, "seed": 0})
        acc = 0.1 * depth + width / 1000
        cb.on_trial_result(0, [], trial, {"epoch": 1, "training_iteration": 1, "config": trial.config,
                                          "linear_probe_acc": acc})
        cb.on_trial_complete(0, [], trial)
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    depth = md.split("## Ablation: decoder depth")[1].split("## ")[0]
    assert "Other factors held at the best setting: decoder embed dim = 32." in depth
    # One seed per setting: no interval, so the best (2) is named but not marked.
    assert "| 1 | 1 | 13.2 |" in depth and "| 2 | 1 | 23.2 |" in depth
    assert "the highest mean LP top-1 (%), 2, cannot be separated from 1 (paired differences, 95% t-interval: " \
           "1 +10.0 (n=1))" in depth
    width = md.split("## Ablation: decoder embed dim")[1].split("## ")[0]
    assert "decoder depth = 2." in width and "| 16 | 1 | 21.6 |" in width
    combined = md.split("## All settings")[1].split("## ")[0]
    assert combined.count("| decoder_depth=") == 4
    assert "the highest mean LP top-1 (%), decoder_depth=2, decoder_embed_dim=32, cannot be separated" in combined
    assert {p.name for p in (tmp_path / "out" / "tables").iterdir()} == {
        f"ablation_{name}.{ext}" for name in ("decoder_depth", "decoder_embed_dim", "all") for ext in ("csv", "tex")}


def test_failed_trial_is_recorded_with_its_error(tmp_path):
    space, _, search_dir = new_search(tmp_path, SPACE)
    cb = ResultsTableCallback(search_dir, 3, space)
    cb.setup()
    trial = FakeTrial("f0", {"masking.mask_ratio": 0.5, "seed": 0})
    trial.error_file = str(tmp_path / "error.txt")
    Path(trial.error_file).write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    cb.on_trial_error(0, [], trial)  # failed before its first epoch
    table = pd.read_parquet(search_dir / "results.parquet")
    assert table[["trial_id", "status", "error", "epoch"]].values.tolist() == [
        ["f0", "failed", "RuntimeError: CUDA out of memory", 0]]
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    assert "| f0 | failed | 0 | 0.5 | 0 | - |" in md and "**No trial has finished yet**" in md


def test_trial_record_survives_the_table_round_trip(tmp_path):
    """What a resumed search reloads is what it wrote: rows -> records -> rows, holes read as empty."""
    from mae_search.search.record import Status, TrialRecord

    search_dir, _ = record(tmp_path, with_mlflow=False)
    table = pd.read_parquet(search_dir / "results.parquet")
    records = [TrialRecord.from_row(row) for row in table.to_dict("records")]
    assert {r.status for r in records} == {Status.COMPLETED, Status.STOPPED, Status.REFERENCE}
    assert all(r.error == "" for r in records)
    reference = next(r for r in records if r.status == Status.REFERENCE)
    assert reference.reference in ("random_init", "raw_pixels") and reference.params == {}
    trial = next(r for r in records if r.trial_id == "t5" and r.epoch == 1)
    assert trial.params == {"masking.mask_ratio": 0.9} and trial.config.masking.mask_ratio == 0.9
    assert trial.metrics["linear_probe_acc"] == pytest.approx((0.45 + 0.01) / 3)
    again = pd.DataFrame.from_records([r.to_row() for r in records])
    assert sorted(again.columns) == sorted(table.columns)
    pd.testing.assert_frame_equal(again[table.columns], table, check_dtype=False)


def test_report_files_a_paper_can_use(tmp_path):
    """LaTeX (booktabs) beside each CSV, SVG beside each 300-dpi PNG, the file's labels for parameters."""
    import struct
    import xml.etree.ElementTree as ET

    text = SPACE_TEMPLATE.replace("SEEDS", "[0, 1]") + "labels: {masking.mask_ratio: masking ratio}\n"
    space, space_file, search_dir = new_search(tmp_path / "labelled", text)
    assert space.label_of("param.masking.mask_ratio") == "masking ratio"
    search_dir, _ = record(tmp_path, with_mlflow=False)
    record_ = load_from_dir(search_dir)
    record_.space.labels["masking.mask_ratio"] = "masking ratio"  # as if the file had given it
    out = tmp_path / "out"
    md = write_report([record_], out, "cmd").read_text()
    assert "| masking ratio | n | LP top-1 (%) |" in md
    tex = (out / "tables" / "ablation.tex").read_text().splitlines()
    assert tex[0].startswith("% Final metrics of finished trials")
    header = next(line for line in md.splitlines() if line.startswith("| masking ratio |"))
    assert tex[1] == r"\begin{tabular}{l" + "r" * (header.count("|") - 2) + "}"
    assert tex[2] == r"\toprule" and r"\midrule" in tex and tex[-1] == r"\end{tabular}" and tex[-2] == r"\bottomrule"
    assert tex[3].startswith(r"masking ratio & n & LP top-1 (\%) &")
    assert any(line.startswith(r"0.5 & 2 & 40.5 $\pm$ 0.7 &") for line in tex)
    for name in ("factor", "curves", "pareto"):
        assert ET.parse(out / f"{name}.svg").getroot().tag.endswith("svg")
        png = (out / f"{name}.png").read_bytes()
        at = png.index(b"pHYs") + 4
        x_ppm, y_ppm, unit = struct.unpack(">IIB", png[at:at + 9])
        assert unit == 1 and round(x_ppm * 0.0254) == 300 == round(y_ppm * 0.0254)


def test_importance_falls_back_to_the_last_common_rung(tmp_path):
    space, _, search_dir = new_search(tmp_path, OPTUNA_SPACE)
    cb = ResultsTableCallback(search_dir, 2, space)
    cb.setup()
    for i in range(11):  # ASHA stops all but one after epoch 1
        ratio, freq = 0.5 + 0.04 * i, 0.2 * ((i * 5) % 11) / 11
        trial = FakeTrial(f"k{i}", {"masking.mask_ratio": ratio, "loss.freq_weight": freq, "seed": 0})
        for epoch in (1, 2) if i == 10 else (1,):
            cb.on_trial_result(0, [], trial, {"epoch": epoch, "training_iteration": epoch, "config": trial.config,
                                              "linear_probe_acc": ratio * epoch / 2})
        cb.on_trial_complete(0, [], trial)
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    section = md.split("## Parameter importances")[1]
    assert "on 11 trials at epoch 1, the last rung every trial reached" in section
    assert section.split("\n\n")[2].splitlines()[2].startswith("| masking.mask_ratio |")
    # With nine trials, no ranking at all: one sentence instead.
    table = pd.read_parquet(search_dir / "results.parquet")
    table[~table["trial_id"].isin(["k0", "k1"])].to_parquet(search_dir / "results.parquet", index=False)
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    section = md.split("## Parameter importances")[1].split("\n\n")[1]
    assert section == ("Too few trials to rank parameters: importances need at least 10 trials measured at a "
                       "common epoch (this search has 9) and 2 searched parameters.")


TARGET_SPACE = """
name: fixture-targets
base: {epochs: 1, model: {patch_size: 4}, loss: {pca_components: 6}}
dimensions:
  loss.target: {grid: [norm_pix, hog]}
factor: loss.target
baseline: norm_pix
metric: linear_probe_acc
select_on: test
mode: max
scheduler: {type: none}
"""


def target_search(tmp_path: Path, metrics: Callable[[int, str, int], dict[str, float]]) -> Path:
    """A recorded norm_pix-vs-HOG search of 2 seeds, one epoch; ``metrics(i, target, seed)`` gives each result."""
    space, _, search_dir = new_search(tmp_path, TARGET_SPACE)
    table = ResultsTableCallback(search_dir, 1, space)
    table.setup()
    for i, (target, seed) in enumerate((t, s) for s in (0, 1) for t in ("norm_pix", "hog")):
        trial = FakeTrial(f"t{i}", {"loss.target": target, "seed": seed})
        table.on_trial_result(0, [], trial, {"epoch": 1, "training_iteration": 1, "config": trial.config,
                                             **metrics(i, target, seed)})
        table.on_trial_complete(0, [], trial)
    table.on_experiment_end([])
    return search_dir


def test_a_reconstruction_target_table_says_its_losses_do_not_compare_across_rows(tmp_path):
    search_dir = target_search(tmp_path, lambda i, target, seed: {
        "linear_probe_acc": 0.3 + 0.02 * i, "test_mse": {"norm_pix": 0.4, "hog": 0.05}[target] + 0.01 * seed,
        **({"psnr": 18.0 + seed} if target == "norm_pix" else {})})
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    rows = ablation_rows(md)
    assert "not comparable across rows" in md
    assert rows["hog"][1] == "2" and "-" in rows["hog"]  # no PSNR for HOG
    # A mask-ratio ablation has no such caveat.
    search_dir, _ = record(tmp_path / "ratio", with_mlflow=False)
    assert "not comparable across rows" not in write_report([load_from_dir(search_dir)], tmp_path / "o2",
                                                            "cmd").read_text()


@pytest.mark.parametrize("winner", ["norm_pix", "hog"])
def test_the_grid_caption_says_when_the_best_trial_has_no_pixels_to_show(tmp_path, winner):
    """The grid is the best trial's; a HOG trial's has no reconstruction, and the caption must not claim one."""
    from mae_search.search.record import BEST_GRID_FILE

    search_dir = target_search(tmp_path, lambda i, target, seed: {
        "linear_probe_acc": 0.3 + 0.01 * seed + (0.05 if target == winner else 0.0)})
    (search_dir / BEST_GRID_FILE).write_bytes(b"\x89PNG grid")  # as a report's data/ archive holds it
    md = write_report([load_from_dir(search_dir)], tmp_path / "out", "cmd").read_text()
    assert ("reconstructs HOG features" in md) == (winner == "hog")
    assert ("| reconstruction with visible patches" in md) == (winner == "norm_pix")
