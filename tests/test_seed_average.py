"""Seed-averaged trials (seeds_per_trial): the space's seeds, the cluster plan, the averaging of the seeds'
reports into one result per epoch, the per-seed records made from it, and ASHA's rungs across a resume."""

import statistics

import pytest

from mae_search.config import ConfigError
from mae_search.search.cluster import plan_concurrency
from mae_search.search.record import PER_SEED_KEY, REPLAY_KEY, TrialRecord, epoch_records
from mae_search.search.strategy import PersistentASHA, param_space
from mae_search.search.trial import SeedAverager
from tests.test_search_space import write

OPTUNA = """
name: avg
base: {epochs: 3}
dimensions:
  optim.blr: {loguniform: [1.0e-4, 1.0e-2]}
metric: loss
mode: min
num_samples: 4
"""


def load(tmp_path, text):
    from mae_search.search.space import load_search_space

    return load_search_space(write(tmp_path, text))


def test_seeds_per_trial_expands_one_seed_and_checks_the_list(tmp_path):
    space = load(tmp_path, OPTUNA + "seeds_per_trial: 3\nseeds: [10]\n")
    assert space.seeds == [10, 11, 12] and space.seed_averaged
    assert space.seeds_of_trial({"optim.blr": 1e-3, "seed": 10}) == [10, 11, 12]
    assert space.total_trials() == 4  # a trial is a configuration, whatever its seeds
    assert param_space(space)["seed"] == 10  # not a grid dimension: every trial trains all three
    assert load(tmp_path, OPTUNA + "seeds_per_trial: 2\nseeds: [4, 9]\n").seeds == [4, 9]
    with pytest.raises(ConfigError, match="seeds_per_trial 2: give one seed .* or exactly 2 seeds, not 3"):
        load(tmp_path, OPTUNA + "seeds_per_trial: 2\nseeds: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match="only with seeds_per_trial: 2"):
        load(tmp_path, OPTUNA + "seeds: [1, 2]\n")
    with pytest.raises(ConfigError, match="repeats a seed"):
        load(tmp_path, OPTUNA + "seeds_per_trial: 2\nseeds: [1, 1]\n")
    # A grid keeps seeds as trials of their own unless it asks for seed-averaged trials.
    grid = OPTUNA.replace("{loguniform: [1.0e-4, 1.0e-2]}", "{grid: [1.0e-3, 1.0e-2]}").replace("num_samples: 4\n", "")
    assert load(tmp_path, grid + "seeds: [0, 1]\n").total_trials() == 4
    assert load(tmp_path, grid + "seeds: [0, 1]\nseeds_per_trial: 2\n").total_trials() == 2


def test_plan_trains_seeds_side_by_side_when_they_fit(tmp_path):
    space = load(tmp_path, OPTUNA + "seeds_per_trial: 2\nmax_concurrent_trials: 4\n")
    def plan(cpus):
        p = plan_concurrency(space, {"CPU": cpus})
        return p.parallel_seeds, p.concurrency

    assert plan(2) == (2, 1) and plan(8) == (2, 4)
    assert plan(1) == (1, 1)  # seeds take turns on a one-core cluster instead of waiting forever


def report(epoch, loss, acc=None):
    metrics = {"epoch": epoch, "loss": loss, "epoch_time_s": 1.0}
    if acc is not None:
        metrics["linear_probe_acc"] = acc
    return metrics


def test_averager_reports_each_epoch_once_all_seeds_have_it():
    avg = SeedAverager([0, 1])
    assert avg.add(0, report(1, 0.8), "/ck/0/1") == []  # seed 1 has not reached epoch 1 yet
    assert avg.add(0, report(2, 0.6, acc=0.5), "/ck/0/2") == []
    [first] = avg.add(1, report(1, 0.4), "/ck/1/1")
    assert first["epoch"] == 1 and first["loss"] == pytest.approx(0.6) and first["seeds"] == 2
    assert first["loss_std"] == pytest.approx(statistics.stdev([0.8, 0.4]))
    assert first[PER_SEED_KEY]["0"]["loss"] == 0.8 and first[PER_SEED_KEY]["1"]["checkpoint_path"] == "/ck/1/1"
    [second] = avg.add(1, report(2, 0.2, acc=0.7), "/ck/1/2")
    assert second["linear_probe_acc"] == pytest.approx(0.6) and second["loss"] == pytest.approx(0.4)


def test_averager_completes_epochs_from_a_restored_seeds_replay():
    """Seed 0 restored from epoch 2, seed 1 from epoch 1: seed 0's replay supplies its epochs 1-2, so
    epoch 2 is reported once seed 1 trains it, and a second replay (a Train-level restart) changes nothing."""
    avg = SeedAverager([0, 1])
    replay0 = {REPLAY_KEY: [{**report(1, 0.9), "checkpoint_path": ""}, {**report(2, 0.7), "checkpoint_path": "/c2"}]}
    assert avg.add(0, replay0, "") == []
    [e1] = avg.add(1, {REPLAY_KEY: [{**report(1, 0.5), "checkpoint_path": "/d1"}]}, "")
    assert e1["epoch"] == 1 and e1[PER_SEED_KEY]["0"]["replayed"] and e1[PER_SEED_KEY]["1"]["replayed"]
    [e2] = avg.add(1, report(2, 0.3), "/d2")
    assert e2["loss"] == pytest.approx(0.5) and e2[PER_SEED_KEY]["0"]["checkpoint_path"] == "/c2"
    assert "replayed" not in e2[PER_SEED_KEY]["1"]
    assert avg.add(0, replay0, "") == []


def test_a_fatal_report_fails_the_trial_at_once():
    from mae_search.search.record import FATAL_KEY
    from mae_search.search.trial import TrialError

    with pytest.raises(TrialError, match="seed 3: DataError: cifar10: missing file"):
        SeedAverager([3]).add(3, {FATAL_KEY: "DataError: cifar10: missing file"}, "")


def test_one_seed_trial_reports_its_own_values_and_checkpoint():
    [result] = SeedAverager([7]).add(7, report(1, 0.3), "/ck")
    assert result["loss"] == 0.3 and result["checkpoint_path"] == "/ck" and "loss_std" not in result


def test_records_of_a_seed_averaged_result(tmp_path):
    space = load(tmp_path, OPTUNA + "seeds_per_trial: 2\nseeds: [5]\n")
    starts = TrialRecord.for_trial(space, "abc_00001", {"optim.blr": 2e-3, "seed": 5})
    assert [(r.trial_id, r.seed, r.tune_trial_id) for r in starts] == [("abc_00001-seed5", 5, "abc_00001"),
                                                                       ("abc_00001-seed6", 6, "abc_00001")]
    assert starts[1].config.seed == 6 and starts[1].config.optim.blr == 2e-3
    avg = SeedAverager([5, 6])
    avg.add(5, report(1, 0.9), "/a")
    [result] = avg.add(6, report(1, 0.1), "/b")
    records = epoch_records(starts, {**result, "time_total_s": 12.0, "training_iteration": 1})
    assert [(r.trial_id, r.epoch, r.metrics["loss"], r.checkpoint, replayed) for r, replayed in records] == [
        ("abc_00001-seed5", 1, 0.9, "/a", False), ("abc_00001-seed6", 1, 0.1, "/b", False)]
    assert TrialRecord.from_row(records[1][0].to_row()) == records[1][0]


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_asha_rungs_survive_a_restart(tmp_path):
    state = tmp_path / "asha_rungs.json"

    def scheduler():
        s = PersistentASHA(state, max_t=4, grace_period=1, reduction_factor=2)
        s.set_search_properties("loss", "min")
        return s

    first = scheduler()
    for trial_id, loss in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        first.on_trial_add(None, _Trial(trial_id))
        first.on_trial_result(None, _Trial(trial_id), {"epoch": 1, "loss": loss})
    counts = first.rung_counts()
    assert counts[0][1] == 3
    second = scheduler()  # as a resumed search builds it
    assert second.rung_counts() == counts
    second.on_trial_add(None, _Trial("d"))
    # d is worse than the recorded half at epoch 1, so the restored rung stops it.
    assert second.on_trial_result(None, _Trial("d"), {"epoch": 1, "loss": 0.9}) == "STOP"
