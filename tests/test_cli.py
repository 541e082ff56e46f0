"""The train command as a user runs it."""

import json

from tests.conftest import cli

CONFIG = """
model: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2,
        decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}
data: {num_train: 128, num_test: 64}
eval: {probe: {epochs: 2}, grid_images: 4, finetune: {epochs: 1, batch_size: 16}}
batch_size: 32
epochs: 2
"""


def test_train_then_resume(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    first = cli("train", "--config", str(config), "--out", str(out), "--eval-init")
    assert "epoch 0 (random init)" in first.stdout and "epoch 2:" in first.stderr + first.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert {"val_linear_probe_acc", "linear_probe_acc"} <= set(json.loads(lines[0]))  # the init, fully
    assert "linear_probe_acc" not in json.loads(lines[1]) and "linear_probe_acc" in json.loads(lines[2])
    assert (out / "reconstruction.png").is_file() and (out / "checkpoint.pt").is_file()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(len(steps))) and len(steps) == 2 * (128 // 32)
    cli("train", "--config", str(config), "--out", str(out), "--resume", "--epochs", "3")
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]  # continued from epoch 2, did not start over


def test_train_errors_are_one_line(tmp_path):
    bad = cli("train", "--set", "masking.mask_ratio=1.5", check=False)
    assert bad.returncode == 2 and "masking.mask_ratio" in bad.stdout and "Traceback" not in bad.stderr
    missing = cli("train", "--set", "data.dataset=stl10", "--set", f"data.path={tmp_path / 'none'}", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stdout
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"corrupt")
    corrupt = cli("train", "--out", str(tmp_path / "run"), "--resume", check=False)
    assert corrupt.returncode == 2 and "corrupt, unreadable or unsafe checkpoint" in corrupt.stdout


def test_list_counts_and_formats(tmp_path):
    """`list` counts a search's configurations by how they ended and shows one not reported yet."""
    import json

    from typer.testing import CliRunner

    from mae_search.cli import app
    from tests.test_report import record

    record(tmp_path, with_mlflow=False)  # 6 trials: 5 completed, 1 stopped by ASHA
    quiet = tmp_path / "results" / "quiet"
    quiet.mkdir()
    (quiet / "search_space.json").write_text(
        (tmp_path / "results" / "fixture-ablation" / "search_space.json").read_text().replace(
            '"fixture-ablation"', '"quiet"'))
    out = CliRunner().invoke(app, ["list", "--storage", str(tmp_path / "results"), "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = {r["search"]: r for r in json.loads(out.output)}
    assert {k: rows["fixture-ablation"][k] for k in ("planned", "done", "stopped", "failed", "running")} == {
        "planned": 6, "done": 5, "stopped": 1, "failed": 0, "running": 0}
    assert rows["fixture-ablation"]["best"] == 51.0 and rows["quiet"]["running"] is None
    table = CliRunner().invoke(app, ["list", "--storage", str(tmp_path / "results")]).output
    assert "fixture-ablation" in table and "…" not in table  # folded to 80 columns, never cut
    wide = CliRunner().invoke(app, ["list", "--storage", str(tmp_path / "results"), "--wide"]).output
    assert "│ quiet " in wide and "not yet reported" in wide
    assert CliRunner().invoke(app, ["list", "--storage", str(tmp_path), "--format", "xml"]).exit_code == 2


def test_list_shows_the_readable_searches_and_fails_on_an_unreadable_one(tmp_path):
    """A damaged results table is named on stderr and the exit is non-zero, after the other searches."""
    from typer.testing import CliRunner

    from mae_search.cli import app
    from tests.test_report import record

    record(tmp_path, with_mlflow=False)
    damaged = tmp_path / "results" / "damaged"
    damaged.mkdir()
    (damaged / "search_space.json").write_text(
        (tmp_path / "results" / "fixture-ablation" / "search_space.json").read_text().replace(
            '"fixture-ablation"', '"damaged"'))
    (damaged / "results.parquet").write_bytes(b"PAR1 torn")
    out = CliRunner().invoke(app, ["list", "--storage", str(tmp_path / "results"), "--format", "json"])
    assert out.exit_code == 1
    assert [r["search"] for r in json.loads(out.stdout)] == ["fixture-ablation"]
    assert f"unreadable {damaged}: cannot be read" in out.stderr


def test_resume_hint_repeats_every_flag_on_one_line():
    """The printed resume command runs the same search: --no-mlflow, the tracking store, the CPUs and each
    --set (quoted for a shell) kept; one line at any terminal width."""
    import io
    import shlex
    from pathlib import Path

    from rich.console import Console

    from mae_search.cli import _resume_command

    command = _resume_command(Path("search_spaces/my space.yaml"), "s3://bucket/results", ["data.path=/d d"],
                              address=None, num_cpus=2, tracking_uri="http://127.0.0.1:5000", mlflow=False)
    assert shlex.split(command) == [
        "mae-search", "search", "search_spaces/my space.yaml", "--storage", "s3://bucket/results",
        "--set", "data.path=/d d", "--num-cpus", "2", "--tracking-uri", "http://127.0.0.1:5000", "--no-mlflow",
        "--resume"]
    narrow = io.StringIO()
    Console(file=narrow, width=40).print(command, soft_wrap=True, highlight=False, markup=False)
    assert narrow.getvalue() == command + "\n"


def test_search_passes_fresh_references_to_the_search(tmp_path, monkeypatch):
    """`--fresh-references` reaches run_search (stopped there: what it does is tests/test_reference_store.py's)."""
    from typer.testing import CliRunner

    import mae_search.search.run as run
    from mae_search.cli import app
    from tests.conftest import micro_space

    seen = []

    def stop_here(*args, **kwargs):
        seen.append(kwargs["fresh_references"])
        raise ValueError("stopped before Ray")

    monkeypatch.setattr(run, "run_search", stop_here)
    space = micro_space(tmp_path, "flag", "dimensions: {}\nmetric: loss\nmode: min\n")
    for extra in ([], ["--fresh-references"]):
        out = CliRunner().invoke(app, ["search", str(space), "--storage", str(tmp_path / "r"), *extra])
        assert out.exit_code == 2 and "stopped before Ray" in out.output
    assert seen == [False, True]
