"""Real clusters on one machine: a search submitted as a Ray job (README's command), and two nodes."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mae_search.search.results import read_results
from tests.conftest import cli_popen, free_port, micro_space, start_ray_head, stop_ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def readme_job_command() -> str:
    """The `ray job submit` command of README's cluster section, as one line."""
    block = re.search(r"```bash\n(RAY_AUTH_MODE=token ray job submit.*?)\n```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no `ray job submit` block"
    return block.group(1).replace("\\\n", " ")


def test_search_submitted_as_a_ray_job_with_readmes_command(tmp_path):
    """`ray start --head`, then README's `ray job submit` (its placeholders replaced by this machine's head,
    a micro space and temporary storage): the job succeeds and leaves its table and MLflow runs."""
    import mlflow

    # The head runs in the project's environment (activated, as on a cluster node), so a job's `python` has
    # the dependencies; the job brings only the code. Its ports are its own (see start_ray_head): the default
    # agent port may still be held by an instance going away, and then no job is ever accepted.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    dashboard = free_port()
    port, _ = start_ray_head("--include-dashboard=true", dashboard_port=dashboard, env=env)
    try:
        space = micro_space(tmp_path, "job", "dimensions:\n  masking.mask_ratio: {grid: [0.6, 0.75]}\n"
                                             "metric: loss\nmode: min\nscheduler: {type: none}\n", epochs=2)
        storage, store = tmp_path / "results", f"sqlite:///{tmp_path / 'mlflow.db'}"
        command = readme_job_command()
        for placeholder, value in {"http://head:8265": f"http://127.0.0.1:{dashboard}",
                                   "search_spaces/joint.yaml": str(space), "/shared/mae-results": str(storage),
                                   "http://mlflow:5000": store, "data.path=/shared/datasets/stl10_binary":
                                   "data.num_test=64"}.items():
            assert placeholder in command, placeholder
            command = command.replace(placeholder, value)
        for _ in range(24):  # a head just started may answer "No available agent ..., try again later" for a while
            job = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=600,
                                 env=env)
            if job.returncode == 0 or "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
        df = read_results(storage / "job")
        assert sorted(df.groupby("trial_id")["epoch"].apply(tuple)) == [(1, 2), (1, 2)]
        assert (df["status"] == "completed").all()
        client = mlflow.MlflowClient(store)
        runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
        tags = [r.data.tags for r in runs]
        trials = {t["mae_search.trial_id"] for t in tags
                  if t.get("mae_search.kind") != "search" and t.get("mae_search.status") != "reference"}
        assert trials == set(df["trial_id"]) and all(r.info.status == "FINISHED" for r in runs)
    finally:
        stop_ray_head(port)


TWO_TRIALS = """
dimensions:
  masking.mask_ratio: {grid: [0.6, 0.75]}
metric: loss
mode: min
scheduler: {type: none}
max_failures: 3
max_concurrent_trials: 2
"""


def test_two_nodes_share_the_trials_and_a_lost_node_costs_no_epoch(tmp_path):
    """A head and a second node with one CPU each: the two trials train one on each (the records say
    which); the second node is killed mid-search; its trial restarts from its checkpoint on the head,
    and the search finishes with every trial-epoch recorded once."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        space = micro_space(tmp_path, "nodes", TWO_TRIALS, epochs=6, num_train=3000)
        storage = tmp_path / "results"
        proc = cli_popen("search", str(space), "--storage", str(storage), "--address", cluster.address)
        table = storage / "nodes" / "results.parquet"
        deadline = time.time() + 300
        while time.time() < deadline:
            df = read_results(table) if table.is_file() else None
            if df is not None and df["trial_id"].nunique() == 2 and df.groupby("trial_id")["epoch"].max().min() >= 2:
                break
            time.sleep(0.2)
        nodes = df.groupby("trial_id")["node_id"].first()
        assert set(nodes) == {cluster.head_node.node_id, second.node_id}, nodes
        moved = nodes[nodes == second.node_id].index[0]
        cluster.remove_node(second, allow_graceful=False)
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
        df = read_results(table)
        assert sorted(df.groupby("trial_id")["epoch"].apply(tuple)) == [tuple(range(1, 7))] * 2, output[-3000:]
        assert (df["status"] == "completed").all()
        after = df[(df["trial_id"] == moved) & (df["node_id"] == cluster.head_node.node_id)]
        assert len(after) and after["restored_from_epoch"].min() >= 1  # continued from a checkpoint, on the head
    finally:
        cluster.shutdown()

