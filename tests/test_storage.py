"""Storage: local paths and an S3-compatible object store (moto's server, started here on 127.0.0.1)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pytest

from mae_search.search.results import read_results
from mae_search.search.search_dir import SearchDir
from mae_search.storage import Location, StorageError, local_dir
from tests.conftest import cli, cli_popen, descendants_titled, free_port, micro_space

BUCKET = "mae-bucket"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket; the AWS variables every process
    here (and the searches it starts) resolve ``s3://`` with. Stopped after the module."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}  # the local mirror of the storage
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            client = boto3.client("s3")
            deadline = time.time() + 60
            while True:
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except Exception:
                    if time.time() > deadline or server.poll() is not None:
                        raise AssertionError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.2)
            yield client
        finally:
            server.terminate()
            server.wait(timeout=30)


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# --------------------------------------------------------------------------- Location, both kinds


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.of(tmp_path / "store")
    request.getfixturevalue("s3")
    return Location.of(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}")


def test_location_reads_writes_lists_and_deletes(root):
    run = root / "search" / "train_runs" / "t1"
    (run / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"two")
    (run / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"one")
    (root / "search" / "search_space.json").write_text('{"name": "search"}')
    assert [c.name for c in run.glob("checkpoint_*")] == ["checkpoint_000001", "checkpoint_000002"]
    assert [p.parent.name for p in root.glob("*/search_space.json")] == ["search"]
    assert (root / "search" / "search_space.json").read_text() == '{"name": "search"}'
    assert (run / "checkpoint_000002").is_dir() and not (run / "checkpoint_000002").is_file()
    assert not (root / "missing").exists() and root.glob("missing/*") == []
    (run / "checkpoint_000001").rmtree()
    assert [c.name for c in run.glob("checkpoint_*")] == ["checkpoint_000002"]
    (root / "search" / "search_space.json").unlink()
    assert not (root / "search" / "search_space.json").exists()
    assert str(root).startswith("s3://" if not root.is_local else "/")


def test_upload_dir_writes_the_named_file_last(root, tmp_path):
    """A checkpoint directory in an object store is complete once its checkpoint file exists: that file
    is written after every other one (locally the directory appears whole, by rename)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("checkpoint.pt", "a.png", "z.json"):
        (source / name).write_text(name)
    target = root / "checkpoint_000001"
    order = []
    original = Location.write_bytes

    def recording(self, data):
        order.append(self.name)
        original(self, data)

    Location.write_bytes = recording
    try:
        target.upload_dir(source, last="checkpoint.pt")
    finally:
        Location.write_bytes = original
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "checkpoint.pt", "z.json"]
    assert (target / "checkpoint.pt").read_text() == "checkpoint.pt"
    if not root.is_local:
        assert order[-1] == "checkpoint.pt" and len(order) == 3


def test_results_table_round_trips_through_the_store(root):
    from mae_search.search.results import write_atomic

    df = pd.DataFrame({"search": ["s"], "trial_id": ["t"], "status": ["completed"], "epoch": [1], "loss": [0.5]})
    write_atomic(df, root / "s" / "results.parquet")
    assert read_results(root / "s").equals(df)
    assert read_results(str(root / "s" / "results.parquet")).equals(df)


def test_checkpoint_errors_name_the_object(s3):
    from mae_search.training.checkpoint import CheckpointError, load_checkpoint

    where = Location.of(f"s3://{BUCKET}/ckpt/checkpoint_000001")
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/ckpt/checkpoint_000001: checkpoint not found"):
        load_checkpoint(where)
    (where / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="corrupt, unreadable or unsafe"):
        load_checkpoint(str(where))


def test_unknown_scheme_is_one_line():
    with pytest.raises(StorageError, match="storage nosuch://bucket/x: "):
        Location.of("nosuch://bucket/x")


def test_sqlite_files_are_copied_to_the_store_and_restored_where_missing(s3):
    import sqlite3

    storage = Location.of(f"s3://{BUCKET}/sqlite")
    study = local_dir(storage) / "search" / "optuna.db"
    study.parent.mkdir(parents=True)
    with sqlite3.connect(study) as db:
        db.execute("create table t (x int)")
        db.execute("insert into t values (7)")
    SearchDir(storage, "search").save_sqlite_copies()
    assert keys(s3, "sqlite/") == ["sqlite/search/optuna.db"]  # no embedded MLflow store here: not copied
    shutil.rmtree(local_dir(storage))  # another machine
    assert SearchDir(storage, "search").restore_sqlite_copies() == [study]
    with sqlite3.connect(study) as db:
        assert db.execute("select x from t").fetchall() == [(7,)]
    assert SearchDir(storage, "search").restore_sqlite_copies() == []  # present: the local one is kept


def test_local_storage_keeps_its_files_in_place(tmp_path):
    storage = Location.of(tmp_path / "results")
    assert local_dir(storage) == tmp_path / "results"
    from mae_search.search.tracking import default_tracking_uri

    assert default_tracking_uri(tmp_path / "results") == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"


# --------------------------------------------------------------------------- searches on S3

SAMPLED = """
dimensions:
  optim.blr: {loguniform: [1.0e-3, 1.0e-2]}
metric: loss
mode: min
num_samples: 2
sampler: random
scheduler: {type: none}
max_concurrent_trials: 1
"""


def wait_for(table: str, ready, proc: subprocess.Popen, timeout_s: float = 300) -> pd.DataFrame:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            df = read_results(table)
        except FileNotFoundError:
            df = None
        except pa.ArrowInvalid:  # this poll raced the search's rewrite of the table on moto's server: poll again
            df = None
        if df is not None and ready(df):
            return df
        time.sleep(0.3)
    raise AssertionError(f"not ready in time; search output: {proc.communicate(timeout=60)[0][-3000:]}")


@pytest.mark.slow
def test_search_on_s3_resumes_on_another_machine_and_reports_from_it(s3, tmp_path):
    """A search with --storage s3://: interrupted mid-trial, its newest checkpoint left incomplete (the
    upload cut before its checkpoint file) and this machine's local mirror gone, it resumes from the older
    checkpoint in the store, with its Optuna study and MLflow store brought back; every trial-epoch is
    recorded once, MLflow's artifacts are in the store, and `list` and `report` work on the URI.
    Nothing is written to a local results directory."""
    import mlflow
    import optuna

    storage = f"s3://{BUCKET}/searches"
    search = f"{storage}/s3search"
    space = micro_space(tmp_path, "s3search", SAMPLED, epochs=5, num_train=3000)
    proc = cli_popen("search", str(space), "--storage", storage, "--num-cpus", "2")
    wait_for(search, lambda df: df["epoch"].max() >= 2, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    before = read_results(search)
    unfinished = before.groupby("trial_id")["epoch"].max().pipe(lambda s: s[s < 5])
    assert len(unfinished) == 1, before
    run_dir = Location.of(search) / "train_runs" / unfinished.index[0]
    checkpoints = run_dir.glob("checkpoint_*")
    assert len(checkpoints) == 2, checkpoints
    (checkpoints[-1] / "checkpoint.pt").unlink()  # as if the upload stopped before its last file
    intact_epoch = int(checkpoints[-2].name.removeprefix("checkpoint_"))
    mirror = local_dir(Location.of(storage))
    assert (mirror / "mlflow.db").is_file() and (mirror / "s3search" / "optuna.db").is_file()
    shutil.rmtree(mirror)  # resumed on another machine

    out = cli("search", str(space), "--storage", storage, "--num-cpus", "2", "--resume", cwd=tmp_path)
    after = read_results(search)
    assert not after.duplicated(["trial_id", "epoch"]).any()
    assert sorted(after.groupby("trial_id")["epoch"].apply(tuple)) == [(1, 2, 3, 4, 5)] * 2, out.stdout[-3000:]
    assert (after["status"] == "completed").all()
    resumed = after[after["trial_id"] == unfinished.index[0]]
    assert resumed["restored_from_epoch"].max() == intact_epoch
    assert after["checkpoint_path"].str.startswith(f"{search}/train_runs/").all()
    assert not (tmp_path / "results").exists()

    # The Optuna study and the MLflow store came back from the store and hold the whole search.
    study = optuna.load_study(study_name="s3search", storage=f"sqlite:///{mirror / 's3search' / 'optuna.db'}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2
    client = mlflow.MlflowClient(f"sqlite:///{mirror / 'mlflow.db'}")
    exp = client.get_experiment_by_name("s3search")
    assert exp.artifact_location == f"{storage}/mlartifacts/s3search"
    runs = client.search_runs([exp.experiment_id])
    trials = {r.data.tags["mae_search.trial_id"]: r for r in runs if r.data.tags.get("mae_search.kind") != "search"
              and r.data.tags.get("mae_search.status") != "reference"}
    assert set(trials) == set(after["trial_id"]) and all(r.info.status == "FINISHED" for r in runs)
    for trial_id, run in trials.items():
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == [1, 2, 3, 4, 5], trial_id
    stored = keys(s3, "searches/mlartifacts/s3search/")
    assert any(k.endswith("best_encoder/encoder.pt") for k in stored), stored
    assert any(k.endswith("reconstruction/epoch_005.png") for k in stored), stored

    listed = cli("list", "--storage", storage, "--format", "csv").stdout
    assert "s3search,2,2,0,0" in listed, listed
    cli("report", search, "--out", f"{storage}/reports/s3search")
    readme = Location.of(f"{storage}/reports/s3search/README.md").read_text()
    assert "s3search" in readme and f"mae-search report {storage}/reports/s3search/data" in readme
    assert "searches/reports/s3search/data/results.parquet" in keys(s3, "searches/reports/")


@pytest.mark.slow
def test_killed_ray_train_worker_restores_from_its_checkpoint_in_s3(s3, tmp_path):
    """The Ray Train runner on S3: its checkpoints are in the store, and a killed worker group restarts
    from the latest of them (read back through the store)."""

    storage = f"s3://{BUCKET}/train"
    space = micro_space(tmp_path, "s3train", """
dimensions:
  masking.mask_ratio: {grid: [0.75]}
metric: loss
mode: min
scheduler: {type: none}
max_failures: 2
resources: {runner: ray_train}
""", epochs=6, num_train=3000)
    proc = cli_popen("search", str(space), "--storage", storage, "--num-cpus", "2")
    wait_for(f"{storage}/s3train", lambda df: df["epoch"].max() >= 2, proc)
    pids = descendants_titled(proc.pid, "ray::RayTrainWorker")
    assert pids, "no Ray Train worker found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-4000:]
    df = read_results(f"{storage}/s3train").sort_values("epoch")
    assert df["epoch"].tolist() == [1, 2, 3, 4, 5, 6] and (df["status"] == "completed").all()
    assert df["restored_from_epoch"].iloc[-1] >= 1, "the restarted worker did not resume from a checkpoint"
    assert df["checkpoint_path"].str.startswith(f"{storage}/s3train/train_runs/").all()
    assert any(k.endswith("/checkpoint.pt") for k in keys(s3, "train/s3train/train_runs/"))


def test_a_store_that_cannot_be_written_is_one_line_before_ray_starts(s3, tmp_path):
    space = micro_space(tmp_path, "nobucket", SAMPLED)
    proc = cli("search", str(space), "--storage", "s3://no-such-bucket/x", check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines[-1].startswith("error: storage s3://no-such-bucket/x cannot be written: ")
    assert "no-such-bucket" in lines[-1] and "Traceback" not in proc.stderr and "Ray:" not in proc.stdout
