"""What a person sees in a browser: the HTML report and the MLflow UI, rendered by headless Chromium.

Chromium comes from the Debian package: the set-up installs it when it is missing and apt can (as
root), and otherwise these tests are skipped with the reason. Screenshots are kept under the test's
temporary directory for a person to look at; the assertions check the rendered page (the DOM after
its scripts ran) for what must be there, and the screenshot for a page that is not blank.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import cli, free_port, start_ui

pytestmark = pytest.mark.slow
REPORT = Path(__file__).parent.parent / "reports" / "improvements-tiny" / "report.html"


@pytest.fixture(scope="session")
def chromium() -> str:
    import fcntl

    with open(Path(tempfile.gettempdir()) / "mae-search-chromium.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # `make test` runs two test processes: one installs, the other waits
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        if not found and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                           timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            found = shutil.which("chromium")
    if not found:
        pytest.skip("headless Chromium is not installed and could not be installed from Debian packages")
    return found


def render(chromium: str, url: str, screenshot: Path, size: str = "1400,1000") -> str:
    """The page's DOM once its scripts have run, and a screenshot of it."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--window-size={size}", "--virtual-time-budget=20000"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=True).stdout


def not_blank(path: Path) -> float:
    """Share of pixels that are not (near) white."""
    image = Image.open(path).convert("L")
    pixels = list(image.getdata())
    return sum(p < 200 for p in pixels) / len(pixels)


def test_html_report_renders_its_tables_and_plots(chromium, tmp_path):
    shot = tmp_path / "report.png"
    dom = render(chromium, REPORT.as_uri(), shot, size="1280,2400")
    assert "<h1>Report: improvements-tiny</h1>" in dom and "<h2>Ablation</h2>" in dom
    assert "random-init encoder (reference)" in dom
    # The best row's label and metric cells are bold, its time cells are not.
    best = re.findall(r'<td class="best">([^<]*)</td>', dom)
    marked = [c.strip().strip("*") for c in next(line for line in (REPORT.parent / "README.md").read_text()
                                                 .splitlines() if line.startswith("| **")).strip("|").split("|")
              if c.strip().startswith("**")]
    assert best[0] == "improved" and best == marked  # the Markdown's bold cells, no more and no fewer
    assert re.search(r'<td class="best">[^<]*</td>\s*<td>\d+\.\d ± \d+\.\d</td>', dom)  # pretrain time, plain
    assert dom.count("data:image/png;base64,") == 4  # factor, Pareto, curves, reconstructions
    assert not_blank(shot) > 0.02


def test_mlflow_ui_shows_the_search_and_a_stopped_trial(chromium, tmp_path):
    from mlflow import MlflowClient

    from tests.test_report import record

    record(tmp_path)  # a search's runs in tmp_path/mlflow.db, through the real callbacks
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fixture-ablation").experiment_id
    [stopped] = client.search_runs([experiment], filter_string="tags.`mae_search.status` = 'stopped_early'")

    port = free_port()
    ui, line = start_ui(tmp_path, port)
    try:
        assert "MLflow UI: http" in line
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment}"
        runs = render(chromium, f"{base}/runs", tmp_path / "mlflow_runs.png")
        assert "fixture-ablation" in runs and "Synthetic recorded results." in runs  # the space's description
        assert "<strong>11</strong> matching runs" in runs  # the parent, 6 trials, 4 reference rows
        run = render(chromium, f"{base}/runs/{stopped.info.run_id}", tmp_path / "mlflow_run.png")
        assert "mask_ratio=0.9 seed=1" in run and "Finished" in run and "stopped_early" in run
        assert "eval/linear_probe_acc" in run
        assert not_blank(tmp_path / "mlflow_runs.png") > 0.01
    finally:
        ui.terminate()
        ui.wait(timeout=60)
    assert cli("list", "--storage", str(tmp_path / "results")).returncode == 0
