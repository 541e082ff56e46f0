"""MLflow tracking against a real server on loopback and the embedded store."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mae_search.search.best_encoder import load_encoder
from mae_search.search.mlflow_runs import MLflowSearchCallback
from mae_search.search.results import read_results
from mae_search.search.results_callback import ResultsTableCallback
from mae_search.search.space import load_search_space
from mae_search.search.tracking import TrackingError, check_tracking
from tests.conftest import ASHA_BLR_BODY, cli, cli_popen, free_port, micro_space

SERVERS: dict[str, subprocess.Popen] = {}


def mlflow_server_stop(uri: str) -> None:
    """Kill a server started by the fixture (to test what happens when tracking goes away)."""
    proc = SERVERS.pop(uri)
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers
    proc.wait(timeout=20)


def mlflow_server_start(root, port: int) -> str:
    """A real `mlflow server` on loopback, its stores under ``root`` (started again on the same port and
    stores, it is the same server back after an outage)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its workers in one group
    )
    uri = f"http://127.0.0.1:{port}"
    SERVERS[uri] = proc
    deadline = time.time() + 180  # a loaded 2-core machine can take over a minute
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return uri
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not come up")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with its stores in a temp dir; stopped afterwards."""
    uri = mlflow_server_start(tmp_path, free_port())
    proc = SERVERS[uri]
    yield uri
    proc = SERVERS.pop(uri, proc)  # a test may have stopped it and started it again
    if proc.poll() is None:  # killed, not asked: its graceful shutdown takes about 10 s, and nothing is left to save
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.slow
def test_search_logged_to_real_mlflow_server(tmp_path, mlflow_server, monkeypatch):
    space = micro_space(tmp_path, "tracked", ASHA_BLR_BODY.format(num_samples=3) + "experiment: tracked-exp\n"
                        "description: Learning rates for the micro model.\n")
    cli("search", str(space), "--storage", str(tmp_path / "results"), "--num-cpus", "2",
        "--tracking-uri", mlflow_server)
    df = read_results(tmp_path / "results" / "tracked")
    client = MlflowClient(mlflow_server)
    parents, children = runs_of(client, "tracked-exp")
    references = [c for c in children if c.data.tags["mae_search.status"] == "reference"]
    children = [c for c in children if c not in references]
    assert len(parents) == 1 and len(children) == df["trial_id"].nunique() == 3
    # The reference rows are child runs too, with the table's values.
    refs = read_results(tmp_path / "results" / "tracked", with_references=True).query("status == 'reference'")
    assert sorted(r.data.tags["mae_search.reference"] for r in references) == ["random_init", "raw_pixels"]
    for run in references:
        row = refs[refs["reference"] == run.data.tags["mae_search.reference"]].iloc[0]
        assert run.data.metrics["eval/linear_probe_acc"] == pytest.approx(row["linear_probe_acc"])
        assert run.info.status == "FINISHED" and run.info.run_name.startswith("reference: ")
    parent = parents[0]
    assert parent.data.tags["mae_search.search"] == "tracked" and "version.ray" in parent.data.tags
    assert "train/best_loss" in parent.data.metrics
    # The space file's description is the experiment's and the parent run's description in the UI.
    assert parent.data.tags["mlflow.note.content"] == "Learning rates for the micro model."
    assert client.get_experiment_by_name("tracked-exp").tags["mlflow.note.content"] == parent.data.tags[
        "mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.parquet", "search_space",
                                                                          "best_encoder"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        trial = df[df["trial_id"] == child.data.tags["mae_search.trial_id"]].sort_values("epoch")
        # Params equal the trial's resolved config.
        assert float(child.data.params["optim.blr"]) == pytest.approx(trial["param.optim.blr"].iloc[0])
        assert child.data.params["seed"] == str(trial["seed"].iloc[0])
        # One metric point per reported epoch, step = epoch, values equal to the table.
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == trial["epoch"].tolist()
        assert np.allclose([m.value for m in sorted(history, key=lambda m: m.step)], trial["loss"])
        # Grouped names: one section per prefix in the MLflow UI.
        assert {"train/mask_ratio", "train/lr", "eval/val_linear_probe_acc", "eval/val_knn_acc", "eval/val_psnr",
                "eval/val_masked_hf_error", "system/epoch_time_s", "system/throughput_img_s", "train/freq_loss",
                "train/unif_loss"} <= set(child.data.metrics)
        # The test split is scored at the last epoch only: a trial ASHA stopped has no test numbers.
        on_test = {"eval/linear_probe_acc", "eval/knn_acc", "eval/psnr"} <= set(child.data.metrics)
        assert on_test == (trial["status"].iloc[-1] == "completed")
        assert child.info.run_name == f"blr={trial['param.optim.blr'].iloc[0]:.3g} seed=0"
        grids = [a.path for a in client.list_artifacts(child.info.run_id, "reconstruction")]
        assert grids and all(p.endswith(".png") for p in grids)
        status = trial["status"].iloc[-1]
        assert child.data.tags["mae_search.status"] == status
        assert child.info.status == "FINISHED"  # stopped early is a normal end, not a red cross
        if status == "stopped_early":
            assert child.data.tags["mae_search.stopped_by"] == "ASHA"
    assert sum(c.data.tags["mae_search.status"] == "stopped_early" for c in children) >= 1
    model, cfg = load_encoder(parent.info.run_id, mlflow_server)
    assert cfg.model.embed_dim == 32 and model.cls_token.shape[-1] == 32
    # The best encoder is an MLflow model: images in, tokens out, the same features as the checkpoint's.
    import mlflow.pytorch
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as a user's own script would point at it
    shared = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/encoder")
    images = torch.rand(3, 3, 16, 16)
    features = shared(images)
    assert features.shape == (3, 1 + 16, 32)
    assert torch.allclose(features, model.eval().forward_features(images), atol=1e-5)


@pytest.mark.slow
def test_embedded_store_and_duplicate_search_guard(tmp_path):
    space = micro_space(tmp_path, "embedded", "dimensions: {}\nmetric: loss\nmode: min\nscheduler: {type: none}\n",
                        epochs=1)
    storage = tmp_path / "r"
    cli("search", str(space), "--storage", str(storage), "--num-cpus", "2")
    parents, children = runs_of(MlflowClient(f"sqlite:///{storage / 'mlflow.db'}"), "embedded")
    trials = [c for c in children if c.data.tags["mae_search.status"] != "reference"]
    assert len(parents) == 1 and len(trials) == 1 and len(children) == 3  # + the two reference rows
    assert trials[0].data.metrics["train/loss"] > 0
    again = cli("search", str(space), "--storage", str(storage), "--num-cpus", "2", check=False)
    assert again.returncode == 2 and "already exists" in again.stdout and "--resume" in again.stdout


def test_unreachable_server_fails_at_start(tmp_path):
    space = micro_space(tmp_path, "unreachable", "dimensions: {}\nmetric: loss\nmode: min\n")
    start = time.time()
    out = cli("search", str(space), "--storage", str(tmp_path / "r"), "--tracking-uri",
              f"http://127.0.0.1:{free_port()}", check=False)
    assert out.returncode == 2 and "unreachable" in out.stdout
    assert time.time() - start < 30
    assert not (tmp_path / "r" / "unreachable").exists()  # nothing ran
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingError, match="a-file is not a directory"):
        check_tracking(f"sqlite:///{blocker / 'x.db'}")
    with pytest.raises(TrackingError, match="missing/dir does not exist"):  # and MLflow did not create it
        check_tracking(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(TrackingError, match="unknown scheme 'garbage'"):
        check_tracking("garbage://host/x")


@pytest.mark.slow
def test_tracking_failure_mid_search_never_raises(tmp_path, monkeypatch, mlflow_server, caplog):
    """The server dies after the parent and a child run exist: the next calls warn once, tracking stops,
    nothing raises into Tune, and the results table (written by its own callback) is complete."""
    space = load_search_space(micro_space(tmp_path, "broken", "dimensions: {}\nmetric: loss\nmode: min\n"))
    search_dir = tmp_path / "results" / "broken"
    tracking = MLflowSearchCallback(mlflow_server, space, search_dir, "x.yaml", max_epochs=3)
    table = ResultsTableCallback(search_dir, 3, space)
    callbacks = [table, tracking]
    for cb in callbacks:
        cb.setup()

    class Trial:
        trial_id, config, error_file, status = "t1", {"seed": 0}, None, "TERMINATED"

    for cb in callbacks:
        cb.on_trial_start(0, [], Trial()) if hasattr(cb, "on_trial_start") else None
        cb.on_trial_result(0, [], Trial(), {"epoch": 1, "training_iteration": 1, "loss": 1.0})
    assert tracking.flush(30)
    assert not tracking.disabled and "t1" in tracking.children  # tracked while the server was up
    mlflow_server_stop(mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with caplog.at_level("WARNING"):
        started = time.monotonic()
        for epoch in (2, 3):  # Tune's driver thread: these return at once although the server is gone
            for cb in callbacks:
                cb.on_trial_result(0, [], Trial(), {"epoch": epoch, "training_iteration": epoch, "loss": 0.5})
        assert time.monotonic() - started < 1.0
        for cb in callbacks:
            cb.on_trial_complete(0, [], Trial())
            cb.on_experiment_end([Trial()])  # waits for the queued calls, bounded
        assert time.monotonic() - started < 60
    assert tracking.disabled
    warnings = [r for r in caplog.records if "tracking disabled" in r.getMessage()]
    assert len(warnings) == 1 and str(search_dir) in warnings[0].getMessage()
    assert read_results(search_dir)[["epoch", "status"]].values.tolist() == [
        [1, "completed"], [2, "completed"], [3, "completed"]]


def test_tracking_flags_given_on_resume_take_effect(tmp_path):
    """Tune restores a search's callbacks from its pickle; the store they log to is the current run's."""
    import pickle

    from mae_search.search.tracking import _ACTIVE, configure_tracking

    space = load_search_space(micro_space(tmp_path, "moved", "dimensions: {}\nmetric: loss\nmode: min\n"))
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    saved = dict(_ACTIVE)
    try:
        configure_tracking(first)
        callback = MLflowSearchCallback(first, space, tmp_path / "s", "x.yaml", max_epochs=1)
        callback.setup()
        assert callback.flush(30)
        restored = pickle.loads(pickle.dumps(callback))  # what --resume gets back from Tune
        configure_tracking(None)  # --resume --no-mlflow
        restored.setup()
        assert restored.disabled
        configure_tracking(second)  # --resume --tracking-uri <another store>
        restored = pickle.loads(pickle.dumps(callback))
        restored.setup()
        assert restored.flush(30)
        assert not restored.disabled and restored.uri == second
    finally:
        _ACTIVE.update(saved)
    assert len(runs_of(MlflowClient(first), "moved")[0]) == 1
    assert len(runs_of(MlflowClient(second), "moved")[0]) == 1  # a parent run in the new store too


@pytest.mark.slow
def test_ui_prints_its_url_once_the_server_answers(tmp_path):
    from tests.conftest import start_ui

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("some-search")
    port = free_port()
    proc, line = start_ui(tmp_path, port)
    try:
        assert f"MLflow UI: http://127.0.0.1:{port}" in line
        # Printed only once the server answers: the health check succeeds at once.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()  # a plain kill: the server it started goes too
        proc.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            time.sleep(1)
        except OSError:
            break
    else:
        raise AssertionError("the MLflow server outlived `mae-search ui`")
    missing = cli("ui", "--storage", str(tmp_path / "elsewhere"), check=False)
    assert missing.returncode == 2 and "pass --storage DIR" in missing.stdout


def _mlflow_view(client: MlflowClient, experiment: str) -> dict:
    """What a researcher sees in MLflow: per child run (by trial id) its status, status tag and, per metric,
    the steps logged (every one, duplicates included)."""
    from mae_search.metrics import mlflow_key

    _, children = runs_of(client, experiment)
    view = {}
    for run in children:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, mlflow_key("mse")))
        view[run.data.tags["mae_search.trial_id"]] = (run.info.status, run.data.tags.get("mae_search.status"),
                                                      steps)
    return view


def test_track_logs_an_untracked_search_once_and_ends_interrupted_runs(tmp_path):
    """`catch_up` mirrors a --no-mlflow search's table into MLflow: a run per trial and reference row, each
    epoch once, ASHA's stop tagged; run again it changes nothing; a trial the table shows unfinished
    (the search was killed) ends KILLED, not RUNNING."""
    from mae_search.search.search_dir import SearchDir
    from mae_search.search.track import catch_up
    from tests.test_report import record

    path, _ = record(tmp_path, with_mlflow=False)
    search_dir = SearchDir.at(path)
    table = read_results(search_dir.results, with_references=True)
    killed = (table["trial_id"] == "t0") & (table["epoch"] == 3)
    table = table[~killed]  # t0 (0.5, seed 0) was mid-way, at epoch 2, when its search was killed
    table.loc[table["trial_id"] == "t0", "status"] = "running"
    table.to_parquet(search_dir.results.path, index=False)
    uri = f"sqlite:///{tmp_path / 'track.db'}"

    first = catch_up(search_dir, uri)
    client = MlflowClient(uri)
    view = _mlflow_view(client, "fixture-ablation")
    assert first.runs == 10 and first.interrupted == 1  # 6 trials + 2 seeds x 2 reference rows
    assert view["t0"] == ("KILLED", "running", [1, 2])
    assert view["t5"] == ("FINISHED", "stopped_early", [1])  # 0.9 / seed 1, stopped by ASHA
    assert all(view[f"t{i}"] == ("FINISHED", "completed", [1, 2, 3]) for i in (1, 2, 3, 4))
    assert {k for k in view if k.startswith("reference")} == {
        f"reference-{kind}-seed{seed}" for kind in ("random_init", "raw_pixels") for seed in (0, 1)}
    [parent], _ = runs_of(client, "fixture-ablation")
    assert parent.info.status == "KILLED"  # a trial never finished: the search did not end

    again = catch_up(search_dir, uri)
    assert again.parent_run_id == first.parent_run_id and _mlflow_view(client, "fixture-ablation") == view


def test_a_reference_run_cut_off_mid_logging_is_finished_by_the_catch_up(tmp_path, monkeypatch):
    """Tracking lost between creating a reference row's run and finishing it (the server gone mid-call,
    as the outage test below can catch it under load): the catch-up finishes that run with its metrics,
    rather than leaving it RUNNING beside a second one."""
    from mlflow.tracking import MlflowClient as Client

    from mae_search.search.search_dir import SearchDir
    from mae_search.search.track import catch_up
    from tests.test_report import record

    path, _ = record(tmp_path, with_mlflow=False)
    search_dir = SearchDir.at(path)
    uri = f"sqlite:///{tmp_path / 'cut.db'}"
    space = load_search_space(tmp_path / "space.yaml")
    tracking = MLflowSearchCallback(uri, space, search_dir, "space.yaml", max_epochs=3)
    real = Client.set_terminated
    monkeypatch.setattr(Client, "set_terminated", lambda *a, **k: (_ for _ in ()).throw(OSError("server gone")))
    with pytest.raises(OSError):
        tracking._setup_parent()  # the first reference run exists, unfinished, when the server goes away
    tracking._lost("metrics failed (server gone)")
    monkeypatch.setattr(Client, "set_terminated", real)
    catch_up(search_dir, uri)
    view = _mlflow_view(MlflowClient(uri), "fixture-ablation")
    refs = {k: v for k, v in view.items() if k.startswith("reference")}
    assert len(refs) == 4 and all(status == "FINISHED" for status, _, _ in refs.values())
    _, children = runs_of(MlflowClient(uri), "fixture-ablation")
    cut = [r for r in children if r.data.tags["mae_search.trial_id"] == "reference-random_init-seed0"]
    assert len(cut) == 1 and cut[0].data.metrics["eval/linear_probe_acc"] == pytest.approx(0.2)


@pytest.mark.slow
def test_server_outage_mid_search_is_caught_up_by_track(tmp_path, mlflow_server):
    """A real MLflow server killed mid-search: the search finishes its trials, names the catch-up command
    in one line and exits 3; with the server back, that command makes MLflow hold every trial and reference
    row once, FINISHED, with every epoch the table holds logged exactly once; run again, nothing changes."""
    import shlex

    body = "dimensions:\n  masking.mask_ratio: {grid: [0.5, 0.75, 0.9]}\nmetric: val_linear_probe_acc\n" \
           "mode: max\nscheduler: {type: none}\nmax_concurrent_trials: 1\n"
    space = micro_space(tmp_path, "outage", body, epochs=2)
    storage = tmp_path / "results"
    proc = cli_popen("search", str(space), "--storage", str(storage), "--num-cpus", "2",
                     "--tracking-uri", mlflow_server)
    table = storage / "outage" / "results.parquet"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # the first trial's first epoch is tracked
        if table.is_file() and (read_results(table)["epoch"] >= 1).any():
            break
        time.sleep(0.2)
    port = int(mlflow_server.rsplit(":", 1)[1])
    mlflow_server_stop(mlflow_server)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 3, out
    [hint] = [line for line in out.splitlines() if "MLflow tracking was lost mid-search" in line]
    command = shlex.split(hint.split("Bring MLflow up to date with: ", 1)[1])
    assert command[:2] == ["mae-search", "track"]

    mlflow_server_start(tmp_path, port)
    caught = cli(*command[1:])
    assert "up to date" in caught.stdout
    recorded = read_results(table, with_references=True)
    client = MlflowClient(mlflow_server)
    view = _mlflow_view(client, "outage")
    trials = recorded[recorded["status"] != "reference"]
    assert view == {
        **{t: ("FINISHED", "completed", sorted(rows["epoch"])) for t, rows in trials.groupby("trial_id")},
        **{r["trial_id"]: ("FINISHED", "reference", [0] if pd.notna(r.get("mse")) else [])
           for _, r in recorded[recorded["status"] == "reference"].iterrows()}}
    [parent], _ = runs_of(client, "outage")
    assert parent.info.status == "FINISHED"
    cli(*command[1:])
    assert _mlflow_view(client, "outage") == view


def test_an_encoder_pretrained_with_mask_tokens_in_it_is_exported_and_loaded_back(tmp_path):
    """The "w/ [M]" encoder's mask token is pre-training only: the export leaves it out and the loader
    does not take its absence for weights that do not fit."""
    import torch

    from mae_search.search.best_encoder import log_best_encoder
    from mae_search.training.train import Trainer
    from tests.conftest import micro_config

    trainer = Trainer(micro_config(**{"model.encoder_mask_token": True}))
    trainer.save(tmp_path / "ckpt" / "checkpoint.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(tracking_uri=uri)
    run_id = store.create_run(store.create_experiment("e", artifact_location=str(tmp_path / "art"))).info.run_id
    log_best_encoder(store, run_id, None, str(tmp_path / "ckpt"))
    model, cfg = load_encoder(run_id, uri)
    assert cfg.model.encoder_mask_token
    assert torch.equal(model.blocks[0].attn.qkv.weight, trainer.model.blocks[0].attn.qkv.weight)
