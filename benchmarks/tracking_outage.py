"""A tracking server that goes away mid-search and comes back: retry with backoff, or give up and catch up?

The same small search runs twice against a real ``mlflow server``, which is
killed once the first epoch is recorded and started again (same port, same
store) ``--outage`` seconds later:

* **catch-up** (the shipped behaviour): bounded HTTP retries (a few seconds),
  then the search stops tracking, finishes, exits 3 and names ``mae-search
  track``, which is run once the server is back;
* **retry**: MLflow's own retry defaults (7 retries with exponential backoff,
  about 4 minutes a call), set through its environment variables, so the
  tracking thread waits for the server to come back.

For each: the search's exit and wall time, whether MLflow held every epoch of
the table when the search ended, and the time until it did (the catch-up
command included). Run: ``python -m benchmarks.tracking_outage [--outage 20]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import machine, write_section

SPACE = """name: outage
base:
  epochs: 3
  batch_size: 32
  model: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2,
          decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}
  optim: {blr: 5.0e-3, warmup_epochs: 0.5}
  data: {num_train: 256, num_test: 64}
  eval: {probe: {epochs: 2}, grid_images: 4, finetune: {epochs: 1, batch_size: 16}}
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75, 0.9]}
metric: val_linear_probe_acc
mode: max
scheduler: {type: none}
max_concurrent_trials: 1
"""
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}  # MLflow's own defaults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)


def epochs_missing(uri: str, table: Path) -> int:
    """Epochs the results table holds that MLflow lacks (each trial's per-epoch MSE history)."""
    from mlflow import MlflowClient

    from mae_search.metrics import mlflow_key
    from mae_search.search.record import TAG_TRIAL_ID
    from mae_search.search.results import read_results

    rows = read_results(table)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("outage")
    runs = {} if exp is None else {
        r.data.tags.get(TAG_TRIAL_ID): r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    missing = 0
    for trial, group in rows.groupby("trial_id"):
        run = runs.get(trial)
        logged = set() if run is None else {
            m.step for m in client.get_metric_history(run.info.run_id, mlflow_key("mse"))}
        missing += len(set(group["epoch"]) - logged)
    return missing


def run_variant(name: str, env: dict[str, str], outage_s: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix=f"outage-{name}-"))
    space = root / "outage.yaml"
    space.write_text(SPACE)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    storage = root / "results"
    table = storage / "outage" / "results.parquet"
    started = time.time()
    search = subprocess.Popen(
        [sys.executable, "-m", "mae_search.cli", "search", str(space), "--storage", str(storage), "--num-cpus", "2",
         "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    from mae_search.search.results import read_results

    while search.poll() is None and not (table.is_file() and (read_results(table)["epoch"] >= 1).any()):
        time.sleep(0.2)
    stop_server(server)
    time.sleep(outage_s)
    server = start_server(root, port)
    out = search.communicate(timeout=1200)[0]
    wall = time.time() - started
    missing_at_end = epochs_missing(uri, table)
    catch_up_s = 0.0
    if search.returncode == 3:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "mae_search.cli", "track", str(storage / "outage"),
                        "--tracking-uri", uri], check=True, capture_output=True)
        catch_up_s = time.time() - t0
    missing_after = epochs_missing(uri, table)
    stop_server(server)
    return {"variant": name, "exit": search.returncode, "wall": wall, "missing_at_end": missing_at_end,
            "catch_up_s": catch_up_s, "missing_after": missing_after, "complete_after_s": wall + catch_up_s,
            "hint": "mae-search track" in out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the server is away")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    rows = [run_variant("catch-up", {}, args.outage), run_variant("retry", RETRY_ENV, args.outage)]
    base = rows[0]["wall"]
    lines = [
        "## A tracking server away mid-search: catch-up command vs retry with backoff (issue 30)\n",
        f"Machine: {machine()}. `python -m benchmarks.tracking_outage --outage {args.outage:.0f}`: a real "
        f"`mlflow server` killed once the first epoch is recorded and started again (same port and store) "
        f"{args.outage:.0f} s later, during a 3-trial search (micro model, 3 epochs, one trial at a time). "
        "catch-up: the shipped bounded retries, then the search stops tracking, exits 3 and names `mae-search "
        "track`, run once the server is back. retry: MLflow's own retry defaults (7 retries, backoff factor 2, "
        "120 s timeout) through its environment variables. 'epochs missing' counts the table's epochs "
        "MLflow lacks.\n",
        "| variant | search exit | search wall (s) | wall ratio | epochs missing at the search's end "
        "| catch-up command (s) | epochs missing after | MLflow complete after (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['exit']} | {r['wall']:.0f} | {r['wall'] / base:.2f} | "
                     f"{r['missing_at_end']} | {r['catch_up_s']:.0f} | {r['missing_after']} | "
                     f"{r['complete_after_s']:.0f} |")
    body = "\n".join(lines) + "\n"
    write_section("tracking-outage", body)


if __name__ == "__main__":
    main()
