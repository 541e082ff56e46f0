"""End-to-end searches through a real local Ray instance (started and stopped by each run)."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mae_search.search.results import read_results
from tests.conftest import (
    ASHA_BLR_BODY,
    cli,
    cli_popen,
    descendants_titled,
    micro_space,
    start_ray_head,
    stop_ray_head,
)

pytestmark = pytest.mark.slow


def test_optuna_selects_on_the_validation_split_and_never_sees_test(tmp_path):
    import optuna

    body = ("dimensions:\n  masking.mask_ratio: {uniform: [0.5, 0.9]}\nmetric: val_linear_probe_acc\nmode: max\n"
            "num_samples: 2\nsampler: random\nscheduler: {type: none}\nmax_concurrent_trials: 2\n")
    space = micro_space(tmp_path, "val", body, epochs=2)
    storage = tmp_path / "results"
    out = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--no-mlflow")
    df = read_results(storage / "val", with_references=True)
    trials, refs = df[df["status"] != "reference"], df[df["status"] == "reference"]
    # Validation at every epoch; test at the last epoch only; the reference rows have both.
    assert trials["val_linear_probe_acc"].notna().all() and trials["eval_val_images"].eq(51).all()  # 20% of 256
    assert trials.groupby("epoch")["linear_probe_acc"].apply(lambda v: v.notna().all()).to_dict() == {1: False, 2: True}
    assert refs[["val_linear_probe_acc", "linear_probe_acc"]].notna().all().all()
    # The persisted study holds each trial's validation value, not its test value.
    study = optuna.load_study(study_name="val", storage=f"sqlite:///{storage / 'val' / 'optuna.db'}")
    final = trials[trials["epoch"] == 2]
    assert sorted(t.value for t in study.trials) == sorted(final["val_linear_probe_acc"])
    # The end of the search opens with the verdict, then the trials table.
    assert "Verdict (test split):" in out.stdout and out.stdout.index("Verdict") < out.stdout.rindex("┏")


def test_killed_worker_resumes_from_checkpoint(tmp_path):
    """A seed's Ray task killed mid-run is retried and resumes from its latest checkpoint. (The Ray Train
    runner's twin is tests/test_storage.py's killed-worker test: the same fault and checks, with its
    checkpoints in an object store.)"""
    space = micro_space(tmp_path, "fault", """
dimensions:
  masking.mask_ratio: {grid: [0.75]}
metric: loss
mode: min
scheduler: {type: none}
max_failures: 2
resources: {runner: ray_task}
""", epochs=8, num_train=3000)
    # Once Tune has epoch 2, the checkpoint of epoch 1 is in the seed's run directory.
    proc, table = start_until(space, tmp_path / "results", "fault", reached_epoch(2))
    pids = descendants_titled(proc.pid, "ray::seed_task")
    assert pids, "no seed task process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-4000:]
    df = read_results(tmp_path / "results" / "fault").sort_values("epoch")
    assert df["epoch"].tolist() == list(range(1, 9))
    assert (df["status"] == "completed").all()
    assert df["restored_from_epoch"].iloc[-1] >= 1, "the restarted worker did not resume from a checkpoint"


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    space = micro_space(tmp_path, "resume", """
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75]}
metric: loss
mode: min
scheduler: {type: none}
max_concurrent_trials: 1
""", epochs=3, num_train=1500)
    storage = tmp_path / "results"
    proc, table = start_until(space, storage, "resume", a_trial_completed)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    before = read_results(table)
    finished = set(before.loc[before["status"] == "completed", "trial_id"])
    assert len(finished) == 1, output[-3000:]
    stamps = {p: p.stat().st_mtime for t in finished for p in (storage / "resume" / "train_runs" / t).rglob("*")}

    out = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--resume")
    after = read_results(table)
    final = after.sort_values("epoch").groupby("trial_id").tail(1)
    assert len(final) == 2 and (final["status"] == "completed").all(), out.stdout[-3000:]
    # Finished trials were not run again: their rows and files are untouched.
    for t in finished:
        old = before[before["trial_id"] == t].reset_index(drop=True)
        new = after[after["trial_id"] == t].reset_index(drop=True)
        assert old["trial_time_s"].tolist() == new["trial_time_s"].tolist()
    assert all(p.stat().st_mtime == m for p, m in stamps.items() if p.exists())
    assert not {p for t in finished for p in (storage / "resume" / "train_runs" / t).rglob("*")} - set(stamps)


@pytest.mark.serial  # its two DDP workers spin in gloo's collectives: 43 s alone, 216 s beside another test
def test_two_worker_ddp_trial(tmp_path):
    """One trial as a 2-worker Ray Train DDP job (gloo on CPU): the shards together cover the batch."""
    space = micro_space(tmp_path, "ddp", """
dimensions: {}
metric: loss
mode: min
scheduler: {type: none}
resources: {workers: 2, cpus_per_worker: 1}
""", epochs=2, num_train=512)
    cli("search", str(space), "--storage", str(tmp_path / "results"), "--num-cpus", "2", "--no-mlflow")
    df = read_results(tmp_path / "results" / "ddp").sort_values("epoch")
    assert df["epoch"].tolist() == [1, 2] and (df["status"] == "completed").all()
    assert df["loss"].iloc[1] < df["loss"].iloc[0]
    # 512 images, batch 32 per worker, 2 workers: 8 steps of 64 images each epoch.
    assert df["throughput_img_s"].gt(0).all()
    assert (df["epoch_time_s"] * df["throughput_img_s"]).round().eq(512).all()


def test_search_joins_an_existing_cluster(tmp_path, monkeypatch):
    """`--address` joins a cluster started with `ray start`, which outlives the search."""
    import subprocess
    import sys

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a client of a cluster sends its token (README)
    port, address = start_ray_head()
    try:
        # As a Ray Train run: on a cluster's node its process group is Ray Train's own (see mae_search.search.ddp).
        space = micro_space(tmp_path, "joined", "dimensions: {}\nmetric: loss\nmode: min\nscheduler: {type: none}\n"
                            "resources: {runner: ray_train}\n", epochs=1)
        out = cli("search", str(space), "--storage", str(tmp_path / "results"), "--address", address, "--no-mlflow")
        assert f"Ray: joined the cluster at {address} (1 node(s), 2 CPU, 0 GPU)" in out.stdout
        assert (read_results(tmp_path / "results" / "joined")["status"] == "completed").all()
        # On a cluster the data path is checked where the trials run, by the reference rows that come first:
        # a missing one stops the search with one line before any trial starts (and is not retried).
        bad = cli("search", str(space), "--storage", str(tmp_path / "results2"), "--address", address, "--no-mlflow",
                  "--set", "data.dataset=cifar10", "--set", "data.path=/nonexistent-mae-search", check=False)
        errors = [line for line in bad.stdout.splitlines() if line.startswith("error:")]
        assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stdout[-2000:]
        assert errors == [f"error: {space}: search 'joined': on the cluster, cifar10: data path "
                          "/nonexistent-mae-search does not exist or is not a directory"]
        probe = f"import ray; ray.init(address={address!r}); print(ray.cluster_resources()['CPU'])"
        still_up = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert still_up.stdout.strip().endswith("2.0")  # the search left the cluster running
    finally:
        stop_ray_head(port)


SEED_AVERAGED_BODY = """
dimensions:
  optim.blr: {loguniform: [1.0e-7, 1.0e-2]}
initial_points:
  - {optim.blr: 5.0e-3}
  - {optim.blr: 1.0e-7}
metric: loss
mode: min
num_samples: 2
seeds_per_trial: 2
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
max_concurrent_trials: 1
"""


def _training_span(run_dir: Path, first_epoch_s: float) -> tuple[float, float]:
    """When a seed's training began (its first checkpoint's time less that epoch's duration) and ended
    (its last checkpoint's time). Run one after the other, the second seed would begin only after the
    first one's task had ended, its final evaluation included."""
    times = sorted(p.stat().st_mtime for p in run_dir.glob("checkpoint_*"))
    assert times, f"no checkpoint in {run_dir}"
    return times[0] - first_epoch_s, times[-1]


def test_seed_averaged_search_optimises_the_mean_and_records_every_seed(tmp_path):
    import mlflow
    import optuna

    storage = tmp_path / "results"
    # 4096 images: epochs long enough (the span about 2 s on 2 cores) that the seeds' overlap is not within
    # the jitter of their tasks' start-up.
    space = micro_space(tmp_path, "avg", SEED_AVERAGED_BODY, epochs=3, num_train=4096)
    out = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2")
    assert "2 trials x 2 seeds" in out.stdout
    df = read_results(storage / "avg")
    # Every configuration trained on both seeds, each seed its own row per epoch.
    assert sorted(df.groupby("tune_trial_id")["seed"].apply(lambda s: tuple(sorted(set(s))))) == [(0, 1)] * 2
    assert not df.duplicated(["trial_id", "epoch"]).any()
    final = df.sort_values("epoch").groupby("trial_id").tail(1)
    means = final.groupby("tune_trial_id")["loss"].mean()
    # Optuna's persisted study holds the mean over seeds as each trial's value, not one seed's.
    study = optuna.load_study(study_name="avg", storage=f"sqlite:///{storage / 'avg' / 'optuna.db'}")
    values = sorted(t.value for t in study.trials if t.value is not None)
    assert len(values) == 2 and np.allclose(values, sorted(means.values), rtol=1e-6)
    # ASHA compared means: the poor learning rate was stopped at its first rung, on both seeds.
    bad = final[np.isclose(final["param.optim.blr"], 1e-7)]
    assert bad["status"].tolist() == ["stopped_early"] * 2 and bad["epoch"].tolist() == [1, 1]
    # The two seeds of a trial trained side by side on the 2 cores (their training spans overlap).
    good = final[np.isclose(final["param.optim.blr"], 5e-3)]["tune_trial_id"].iloc[0]
    runs = storage / "avg" / "train_runs"
    first_epoch_s = df[(df["tune_trial_id"] == good) & (df["epoch"] == 1)].set_index("seed")["epoch_time_s"]
    (start0, end0), (start1, end1) = (_training_span(runs / f"{good}-seed{s}", first_epoch_s[s]) for s in (0, 1))
    assert start1 < end0 and start0 < end1, ((start0, end0), (start1, end1))
    # MLflow: a child run per seed, every epoch logged once.
    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avg")
    runs_by_id = {r.data.tags.get("mae_search.trial_id"): r for r in client.search_runs([exp.experiment_id])}
    for trial_id, rows in df.groupby("trial_id"):
        steps = [m.step for m in client.get_metric_history(runs_by_id[trial_id].info.run_id, "train/loss")]
        assert sorted(steps) == sorted(rows["epoch"]), trial_id
    # The report ranks configurations by their mean over seeds.
    cli("report", str(storage / "avg"), "--out", str(tmp_path / "report"))
    md = (tmp_path / "report" / "README.md").read_text()
    assert f"| {good} (2 seeds) | 0.005 |" in md and "2 of 2 planned x 2 seeds" in md
    # ... and shows the best trial's reconstruction grid, the one its last checkpoint holds.
    best = final.loc[final["loss"].idxmin()]
    grid = (Path(best["checkpoint_path"]) / "reconstruction.png").read_bytes()
    assert "![best trial reconstructions](best_reconstruction.png)" in md
    assert (tmp_path / "report" / "best_reconstruction.png").read_bytes() == grid


def test_resumed_optuna_asha_search_continues_sampler_and_rungs(tmp_path):
    """An Optuna + ASHA search, interrupted after its first trial: resumed, it neither repeats a
    configuration (Optuna's history continues) nor forgets ASHA's rungs (the poor trial is still cut at
    its first rung); the table and MLflow hold every trial-epoch exactly once, the reference rows once,
    and `list` counts the trials as they ended."""
    import mlflow

    storage = tmp_path / "results"
    space = micro_space(tmp_path, "resumed", ASHA_BLR_BODY.format(num_samples=3), epochs=3, num_train=256)
    proc, table = start_until(space, storage, "resumed", a_trial_completed)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    before = read_results(table)
    assert set(before["status"]) >= {"completed"} and before["trial_id"].nunique() < 3, output[-3000:]
    rungs_before = json.loads((storage / "resumed" / "asha_rungs.json").read_text())

    out = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--resume")
    after = read_results(table)
    final = after.sort_values("epoch").groupby("trial_id").tail(1)
    assert len(final) == 3, out.stdout[-3000:]
    blrs = sorted(final["param.optim.blr"])
    assert len(set(np.round(np.log10(blrs), 6))) == 3, f"a configuration ran twice: {blrs}"
    # The rungs recorded before the interruption are still there, and the 1e-7 trial was cut by them.
    rungs_after = json.loads((storage / "resumed" / "asha_rungs.json").read_text())
    for (milestone, recorded), (_, now) in zip(rungs_before["brackets"][0], rungs_after["brackets"][0], strict=True):
        assert set(recorded) <= set(now), f"rung {milestone} lost trials on resume"
    bad = final[np.isclose(final["param.optim.blr"], 1e-7)]
    assert bad["status"].item() == "stopped_early" and bad["epoch"].item() == 1
    assert final[np.isclose(final["param.optim.blr"], 5e-3)]["status"].item() == "completed"
    assert {"loss", "mse", "mask_ratio", "lr", "linear_probe_acc", "psnr", "config_json"} <= set(after.columns)
    # The reference rows of the search's seed, evaluated by the same code before the trials, recorded once.
    refs = read_results(table, with_references=True).query("status == 'reference'").set_index("reference")
    assert sorted(refs.index) == ["random_init", "raw_pixels"] and (refs["seed"] == 0).all()
    assert refs["linear_probe_acc"].between(0, 1).all() and refs["finetune_acc"].notna().tolist() == [True, False]
    assert "reference random-init (1 seed): LP " in out.stdout and "reference raw-pixels (1 seed): LP " in out.stdout
    [listed] = json.loads(cli("list", "--storage", str(storage), "--format", "json").stdout)
    assert (listed["search"], listed["planned"], listed["failed"], listed["objective"]) == ("resumed", 3, 0, "min loss")
    assert listed["done"] + listed["stopped"] == 3 and listed["stopped"] >= 1
    # Every trial-epoch exactly once, in the table and in MLflow.
    assert not after.duplicated(["trial_id", "epoch"]).any()
    for _, rows in after.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, rows["epoch"].max() + 1))
    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resumed")
    runs = {r.data.tags.get("mae_search.trial_id"): r for r in client.search_runs([exp.experiment_id])}
    for trial_id, rows in after.groupby("trial_id"):
        steps = [m.step for m in client.get_metric_history(runs[trial_id].info.run_id, "train/loss")]
        assert sorted(steps) == sorted(rows["epoch"]), trial_id


ONE_LONG_TRIAL = """
dimensions:
  masking.mask_ratio: {grid: [0.75]}
metric: loss
mode: min
scheduler: {type: none}
"""


def start_until(space: Path, storage: Path, name: str, ready) -> tuple:
    """Start a search in a child process; return it and its table once ``ready(table)`` holds (or 300 s)."""
    proc = cli_popen("search", str(space), "--storage", str(storage), "--num-cpus", "2")
    table = storage / name / "results.parquet"
    deadline = time.time() + 300
    while time.time() < deadline and not (table.is_file() and ready(read_results(table))):
        time.sleep(0.2)
    return proc, table


def reached_epoch(epoch: int):
    return lambda df: df["epoch"].max() >= epoch


def a_trial_completed(df) -> bool:
    return bool((df["status"] == "completed").any())


def trial_run_steps(storage: Path, experiment: str) -> tuple[list[int], str]:
    """The epochs the search's one trial run holds in MLflow (each should appear once), and its status."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    [run] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mae_search.status") != "reference"
             and r.data.tags.get("mae_search.kind") != "search"]
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")), run.info.status


def test_killed_driver_resumes_from_its_last_intact_checkpoint_with_every_epoch_once(tmp_path):
    """SIGKILL of the `mae-search search` process itself mid-trial (no handler runs); then, as if the last
    result never reached the table and the last checkpoint was torn: --resume restarts the trial from the
    older intact checkpoint, replays the epoch the table lost, and the table and MLflow end with every
    epoch exactly once, the run FINISHED. (Ctrl-C mid-trial, exit 130, is the S3 resume test's fault.)"""
    from mae_search.training.checkpoint import load_checkpoint

    storage = tmp_path / "results"
    space = micro_space(tmp_path, "killed", ONE_LONG_TRIAL, epochs=6, num_train=3000)
    proc, table = start_until(space, storage, "killed", reached_epoch(3))
    proc.kill()
    proc.communicate(timeout=60)
    time.sleep(5)  # Ray's reaper takes down the killed driver's local instance (and its last writes)
    df = read_results(table)
    assert df["epoch"].max() < 6, "the trial finished before the kill"
    run_dir = next((storage / "killed" / "train_runs").iterdir())
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "checkpoint.pt").is_file())
    assert len(checkpoints) >= 2
    latest = checkpoints[-1] / "checkpoint.pt"
    torn_epoch = load_checkpoint(latest)["epoch"]
    intact_epoch = load_checkpoint(checkpoints[-2] / "checkpoint.pt")["epoch"]
    latest.write_bytes(latest.read_bytes()[:1000])
    # The intact checkpoint's epoch is not trained again: only the restored trial's replay can bring it back.
    df[df["epoch"] != intact_epoch].to_parquet(table, index=False)

    out = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--resume")
    after = read_results(table).sort_values("epoch")
    assert after["epoch"].tolist() == [1, 2, 3, 4, 5, 6], out.stdout[-2000:]
    assert (after["status"] == "completed").all()
    restored = after[after["restored_from_epoch"] > 0]["restored_from_epoch"]
    assert restored.max() == intact_epoch < torn_epoch  # from the intact checkpoint before the torn one
    assert trial_run_steps(storage, "killed") == ([1, 2, 3, 4, 5, 6], "FINISHED")


def test_ctrl_c_while_ray_starts_stops_with_nothing_recorded(tmp_path):
    """Ctrl-C after the checks, while the local Ray instance starts: exit 130, one line saying nothing was
    recorded, no traceback, and no search folder a later run would mistake for a started search."""
    space = micro_space(tmp_path, "ctrlc0", "metric: val_linear_probe_acc\nmode: max\n", epochs=1)
    storage = tmp_path / "results"
    proc = cli_popen("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--no-mlflow")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("search ctrlc0:"):  # the checks passed; Ray is starting now
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert out.strip().splitlines()[-1] == "search interrupted before it started: nothing was recorded", out
    assert "Traceback" not in out and not (storage / "ctrlc0" / "search_space.json").exists(), out


def test_ctrl_c_during_the_reference_rows_stops_and_the_printed_command_resumes(tmp_path):
    """Ctrl-C while the reference rows are evaluated (before any trial) stops the search with exit 130
    and a resume command on one line that keeps --no-mlflow; running that command finishes the search,
    with each reference row recorded once and no MLflow store created."""
    import shlex

    body = """
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75]}
metric: val_linear_probe_acc
mode: max
scheduler: {type: none}
"""
    space = micro_space(tmp_path, "ctrlc", body, epochs=2)
    storage = tmp_path / "results"
    proc = cli_popen("search", str(space), "--storage", str(storage), "--num-cpus", "2", "--no-mlflow")
    record = storage / "ctrlc" / "search_space.json"
    deadline = time.time() + 180
    while not record.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert record.is_file(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert not (storage / "ctrlc" / "results.parquet").exists(), "the signal came after the reference rows"
    assert "search interrupted before its trials" in out and "Traceback" not in out, out
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:3] == ["mae-search", "search", str(space)] and command[-2:] == ["--no-mlflow", "--resume"]

    resumed = cli(*command[1:])
    df = read_results(storage / "ctrlc", with_references=True)
    finals = df[df["status"] == "completed"].groupby("trial_id")["epoch"].max()
    assert sorted(finals) == [2, 2], resumed.stdout
    assert sorted(df.loc[df["status"] == "reference", "reference"]) == ["random_init", "raw_pixels"]
    assert not (storage / "mlflow.db").exists()
    assert_a_later_search_reads_the_reference_rows(tmp_path, storage, first="ctrlc")


def assert_a_later_search_reads_the_reference_rows(tmp_path: Path, storage: Path, first: str) -> None:
    """A second search with the same seed, data, model and evaluation reads the first's reference rows
    instead of computing them (tests/test_reference_store.py: what keys them, and --fresh-references).
    Part of the Ctrl-C test, whose finished search is the first: one search less to run."""
    # Another pre-training and another evaluation schedule: the reference rows do not depend on them.
    body = "dimensions: {masking.mask_ratio: {grid: [0.6]}}\nmetric: loss\nmode: min\nscheduler: {type: none}\n"
    second = micro_space(tmp_path, "second", body, epochs=2)
    out = cli("search", str(second), "--storage", str(storage), "--num-cpus", "2", "--no-mlflow",
              "--set", "eval.every_epochs=2")
    said = out.stdout.replace("\n", "")  # as one line, however the terminal wrapped it
    assert f"reference rows: 2 of 2 read from {storage / '_references'} (computed by {first};" in said

    def references(name: str):
        df = read_results(storage / name, with_references=True)
        return df[df["status"] == "reference"].set_index("reference").sort_index()

    columns = ["linear_probe_acc", "val_linear_probe_acc", "knn_acc", "val_knn_acc", "finetune_acc"]
    assert references("second")[columns].equals(references(first)[columns])
    assert (references("second")["search"] == "second").all()  # each search's table holds its own rows
    assert sorted(p.name.split("-")[0] for p in (storage / "_references").iterdir()) == ["random_init", "raw_pixels"]
    listed = json.loads(cli("list", "--storage", str(storage), "--format", "json").stdout)
    assert sorted(s["search"] for s in listed) == [first, "second"]  # the store is not a search
