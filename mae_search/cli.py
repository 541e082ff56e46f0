"""Command line: ``mae-search train | search | list | report | ui``.

Every user-facing error (bad config, missing data, corrupt checkpoint, bad
search space, unreachable MLflow) is a subclass of ValueError raised with a
one-line message; ``main`` prints it as ``error: ...`` and exits 2 instead of a
traceback.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mae_search.config import ConfigError, TrainConfig

DEFAULT_SEARCH = Path(__file__).with_name("default_search.yaml")
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()


@app.callback()
def _root() -> None:
    """Ablations and hyperparameter searches of Masked Autoencoders on Ray, tracked in MLflow."""


TRACKING_LOST_EXIT = 3  # every trial ended well but MLflow missed part of the search (`mae-search track` mends it)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig; the tiny embedded default if omitted")] = None,
    out: Annotated[Path, typer.Option(help="directory for checkpoint, metrics and grid")] = Path("results/train"),
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    epochs: Annotated[int | None, typer.Option(help="override epochs")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set masking.mask_ratio=0.9")] = None,
    eval_init: Annotated[bool, typer.Option(help="evaluate the random init first (epoch 0)")] = False,
) -> None:
    """Pre-train one MAE with a progress bar and per-epoch metrics (no Ray needed)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mae_search.training.train import Trainer

    try:
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        overrides = dict(_parse_assignment(s) for s in set_ or [])
        if epochs is not None:
            overrides["epochs"] = epochs
        if overrides:
            cfg = cfg.with_overrides(overrides, source="--set")
        trainer = Trainer(cfg)
        ckpt = out / "checkpoint.pt"
        if resume:
            trainer.resume(ckpt)
            console.print(f"resumed from {ckpt} at epoch {trainer.epoch}")
    except ValueError as exc:
        _fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    if eval_init and trainer.epoch == 0:
        initial = {**trainer.evaluate(final=True), "epoch": 0}  # the full protocol: FT here = from scratch
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(initial) + "\n")
        console.print("epoch 0 (random init): " + "  ".join(
            f"{k}={initial[k]:.4g}" for k in ("linear_probe_acc", "knn_acc", "finetune_acc", "psnr") if k in initial))
    progress = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = progress.add_task("pretrain", total=cfg.epochs, completed=trainer.epoch)

    def on_epoch_end(epoch: int, metrics: dict[str, float], t: Trainer) -> None:
        t.save(ckpt)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        with (out / "steps.jsonl").open("a") as f:  # mask ratio and lr in force at every step
            f.writelines(json.dumps(s) + "\n" for s in t.step_log)
        t.step_log.clear()
        progress.advance(task)
        keys = ("loss", "mask_ratio", "val_linear_probe_acc", "val_knn_acc", "linear_probe_acc", "knn_acc",
                "finetune_acc", "psnr")
        shown = {k: metrics[k] for k in keys if k in metrics}
        progress.console.print(f"epoch {epoch}: " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()),
                               highlight=False)

    with progress:
        trainer.fit(on_epoch_end)
    grid = trainer.save_reconstruction(out / "reconstruction.png")
    console.print(f"done: checkpoint {ckpt}, metrics {out / 'metrics.jsonl'}, grid {grid}")


@app.command()
def search(
    space_file: Annotated[Path, typer.Argument(help="search_spaces/<name>.yaml; default: embedded quickstart")] = (
        DEFAULT_SEARCH
    ),
    storage: Annotated[str, typer.Option(
        help="results root: a local dir, a shared filesystem, or an object store (s3://bucket/prefix)")] = "results",
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="existing Ray cluster: auto or "
                                                 "ray://host:10001 (none: a local instance, on loopback)")] = None,
    resume: Annotated[bool, typer.Option(help="resume an interrupted search; finished trials are not rerun")] = False,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for a local Ray instance (default: all)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override base config: data.path=/data")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow server or store; default MLFLOW_TRACKING_URI, else STORAGE/mlflow.db")] = None,
    mlflow: Annotated[bool, typer.Option(help="log the search to MLflow")] = True,
    fresh_references: Annotated[bool, typer.Option(
        help="compute the reference rows even when an earlier search under STORAGE stored them")] = False,
) -> None:
    """Run an ablation or hyperparameter search on Ray (Tune + Train, Optuna, ASHA), tracked in MLflow."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not the embedded store's table-creation notices
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # also when MLflow is imported
    again = _resume_command(space_file, storage, set_, address=address, num_cpus=num_cpus,
                            tracking_uri=tracking_uri, mlflow=mlflow)
    space = None
    try:  # the imports too: a Ctrl-C while they load (seconds) is answered like any other
        from mae_search.report.load import load_from_dir
        from mae_search.report.terminal import print_references, print_trials, print_verdict
        from mae_search.report.verdict import verdict
        from mae_search.search.record import PARAM_PREFIX
        from mae_search.search.results import final_rows, read_results
        from mae_search.search.run import run_search
        from mae_search.search.search_dir import SearchDir
        from mae_search.search.space import load_search_space
        from mae_search.search.track import lost_tracking

        space = load_search_space(space_file, overrides=dict(_parse_assignment(a) for a in set_ or []))
        done = run_search(space, storage, space_file=space_file, address=address, resume=resume,
                          num_cpus=num_cpus, tracking_uri=tracking_uri, mlflow=mlflow,
                          fresh_references=fresh_references, console=console)
    except ValueError as exc:
        message = str(exc)
        _fail(f"{space_file}: {message}" if message.startswith("search '") else message)  # name the file too
    except KeyboardInterrupt:  # Ctrl-C before Tune's own handling (pre-flight, reference rows)
        _interrupted(SearchDir.of(storage, space.name) if space else None, again)
    if done.trials is None:
        _fail(f"search '{space.name}' ended before any trial reported a result")
    results = done.search_dir.results
    try:
        print_verdict(console, verdict(space, load_from_dir(done.search_dir.root).table))
        print_trials(console, final_rows(read_results(results)), space.primary.metric, space.primary.mode,
                     {f"{PARAM_PREFIX}{k}": space.label_of(k) for k in space.dimensions})
        print_references(console, read_results(results, with_references=True))
    except KeyboardInterrupt:  # Ctrl-C while the summary prints: the search itself is recorded in full
        console.print(f"[yellow]interrupted[/] while printing the summary; the table is complete: {results} "
                      f"(mae-search report {done.search_dir} shows it)", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    seeds = f" x {space.seeds_per_trial} seeds" if space.seed_averaged else ""
    console.print(f"{len(done.trials)} trials{seeds} in {done.wall_s:.0f}s; table: {results}")
    if done.failed:
        console.print(f"[red]{done.failed} trial(s) failed[/]: their errors are in the table's error column")
    lost = lost_tracking(done.search_dir)
    if lost:
        console.print(f"[yellow]MLflow tracking was lost mid-search[/] ({lost}); the results table is complete. "
                      f"Bring MLflow up to date with: mae-search track {done.search_dir}"
                      + (f" --tracking-uri {tracking_uri}" if tracking_uri else ""),
                      highlight=False, soft_wrap=True)
    if done.unfinished > 0:
        console.print(f"[yellow]search interrupted[/]: {done.unfinished} trials unfinished; continue with")
        console.print(again, soft_wrap=True, highlight=False, markup=False)  # one line, to copy whole
        raise typer.Exit(130)  # as a shell reports an interrupted command
    if done.failed:
        raise typer.Exit(1)  # 0 only when every trial completed or was stopped by the scheduler
    if lost:
        raise typer.Exit(TRACKING_LOST_EXIT)


def _interrupted(search_dir: Any, again: str) -> None:
    """Ctrl-C before any trial ran: say what is recorded and how to go on; exit 130 as a shell would."""
    if search_dir is not None and search_dir.space_file.is_file():
        console.print("[yellow]search interrupted[/] before its trials (reference rows already evaluated are "
                      "kept); continue with")
        console.print(again, soft_wrap=True, highlight=False, markup=False)
    else:
        console.print("[yellow]search interrupted[/] before it started: nothing was recorded")
    raise typer.Exit(130)


def _resume_command(space_file: Path, storage: str, set_: list[str] | None, **flags: Any) -> str:
    """The command that continues this search: every flag it was given, quoted for a shell, plus --resume."""
    words = ["mae-search", "search", str(space_file), "--storage", storage]
    for assignment in set_ or []:
        words += ["--set", assignment]
    for name in ("address", "num_cpus", "tracking_uri"):
        if flags[name] is not None:
            words += [f"--{name.replace('_', '-')}", str(flags[name])]
    if not flags["mlflow"]:
        words.append("--no-mlflow")
    return shlex.join([*words, "--resume"])


@app.command("list")
def list_searches(
    storage: Annotated[str, typer.Option(help="results root (a local dir or s3://bucket/prefix)")] = "results",
    format_: Annotated[str, typer.Option("--format", help="table, csv, markdown or json")] = "table",
    wide: Annotated[bool, typer.Option(help="one line per search however wide the terminal")] = False,
) -> None:
    """Show the searches under STORAGE: trials planned, done, stopped, failed and running, and the best."""
    import pandas as pd
    from rich.table import Table

    from mae_search.metrics import metric as registered
    from mae_search.search.record import Status
    from mae_search.search.results import search_summary
    from mae_search.search.search_dir import SPACE_FILE, SearchDir
    from mae_search.storage import Location, StorageError

    if format_ not in ("table", "csv", "markdown", "json"):
        _fail(f"--format {format_}: expected table, csv, markdown or json")
    try:
        dirs = [SearchDir.at(p.parent) for p in Location.of(storage).glob(f"*/{SPACE_FILE}")]
    except (StorageError, OSError) as exc:
        _fail(f"--storage {storage}: {str(exc).splitlines()[0]}")
    if not dirs:
        _fail(f"no searches under {storage}")
    rows, unreadable = [], []
    for d in dirs:
        try:
            s = search_summary(d)
        except Exception as exc:  # noqa: BLE001 - one damaged search must not hide the others
            unreadable.append(f"{d}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        counts, best, spec = s["counts"], s["best"], registered(s["metric"])
        rows.append({
            "search": s["name"], "planned": s["planned"], "done": counts.get(Status.COMPLETED, 0),
            "stopped": counts.get(Status.STOPPED, 0), "failed": counts.get(Status.FAILED, 0),
            "running": counts.get(Status.RUNNING, 0) if counts else None, "objective": f"{s['mode']} {s['metric']}",
            "best": None if best is None else round(float(best[s["metric"]]) * spec.scale, spec.digits),
            "best_trial": None if best is None else str(best["trial_id"]),
        })
    if format_ != "table":
        df = pd.DataFrame(rows)
        text = {"csv": lambda: df.to_csv(index=False), "markdown": lambda: df.to_markdown(index=False) + "\n",
                "json": lambda: df.to_json(orient="records", indent=2) + "\n"}[format_]()
        sys.stdout.write(text)
    else:
        objectives = "; ".join(f"{r['search']}: {r['objective']}" for r in rows)
        table = Table("search", "planned", "done", "stopped", "failed", "running", "best", "best trial",
                      caption=f"best: the objective's best final value ({objectives})")
        for column in table.columns:
            column.overflow = "fold"
            column.no_wrap = wide or column.header in ("search", "best", "best trial")
        for r in rows:
            running = "not yet reported" if r["running"] is None else str(r["running"])
            table.add_row(r["search"], str(r["planned"]), str(r["done"]), str(r["stopped"]), str(r["failed"]),
                          running, "-" if r["best"] is None else str(r["best"]), r["best_trial"] or "-")
        (Console(width=10_000) if wide else console).print(table)
    for line in unreadable:
        Console(stderr=True).print(f"[yellow]unreadable[/] {line}", highlight=False, soft_wrap=True)
    if unreadable:
        raise typer.Exit(1)  # a script reading the list must not take a damaged search for an absent one


@app.command()
def report(
    sources: Annotated[list[str] | None, typer.Argument(
        help="search directories (results.parquet + space): local, or s3://bucket/prefix/<search>")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (local or s3://...); default reports/<search>")
                   ] = None,
    mlflow_experiment: Annotated[str | None, typer.Option("--mlflow", help="read an MLflow experiment instead")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store for --mlflow")] = None,
) -> None:
    """Regenerate ablation tables and plots (Markdown, HTML, CSV) from recorded results."""
    import os
    import tempfile

    from mae_search.report.build import write_report
    from mae_search.report.load import ReportError, load_from_dir, load_from_mlflow
    from mae_search.storage import Location, is_uri

    try:
        if mlflow_experiment:
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise ReportError("--mlflow needs --tracking-uri (or MLFLOW_TRACKING_URI)")
            records = [load_from_mlflow(mlflow_experiment, uri)]
        elif sources:
            records = [load_from_dir(s) for s in sources]
        else:
            raise ReportError("give a search directory (e.g. results/quickstart) or --mlflow EXPERIMENT")
    except (ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0])
    target = out or str(Path("reports") / records[0].space.name)
    command = f"mae-search report {target.rstrip('/')}/data --out {target}"
    if len(records) > 1 or mlflow_experiment:
        command = "mae-search report " + (f"--mlflow {mlflow_experiment} --tracking-uri <uri>" if mlflow_experiment
                                          else " ".join(map(str, sources))) + f" --out {target}"
    if not is_uri(target):
        readme = write_report(records, target, command)
        console.print(f"report: {readme} (+ report.html, tables/*.csv, plots)")
        return
    with tempfile.TemporaryDirectory() as tmp:  # written here, then uploaded beside the search
        write_report(records, tmp, command)
        Location.of(target).upload_dir(Path(tmp))
    console.print(f"report: {target}/README.md (+ report.html, tables/*.csv, plots)", highlight=False)


@app.command()
def track(
    search_dir: Annotated[str, typer.Argument(help="a search's directory: STORAGE/<search> (local or s3://)")],
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow server or store; default MLFLOW_TRACKING_URI, else the embedded store of the storage")] = None,
) -> None:
    """Log a search to MLflow from its results table (after --no-mlflow, or a tracking server that went away
    mid-search); idempotent: existing runs are completed, nothing is logged twice."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from mae_search.search.search_dir import SearchDir
    from mae_search.search.track import catch_up
    from mae_search.search.tracking import check_tracking, configure_tracking, resolve_tracking_uri

    where = SearchDir.at(search_dir)
    try:
        if not where.space_file.is_file():
            raise ValueError(f"{search_dir}: not a search directory (no {where.space_file.name})")
        uri = resolve_tracking_uri(tracking_uri, where.storage)
        check_tracking(uri)
        configure_tracking(uri)  # bounded HTTP retries
        caught = catch_up(where, uri)
    except (ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0])
    killed = f"; {caught.interrupted} unfinished trial run(s) ended KILLED" if caught.interrupted else ""
    console.print(f"MLflow {uri}: search run {caught.parent_run_id} with {caught.runs} child runs, up to date "
                  f"with {where.results}{killed}", highlight=False, soft_wrap=True)


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="ImageFolder tree (train/, val/), STL-10 or CIFAR-10 directory, "
                                               "or synthetic_shapes (the embedded generated set)")],
    out: Annotated[str, typer.Argument(help="where the prepared set goes (local, shared, or s3://bucket/prefix)")],
    dataset: Annotated[str | None, typer.Option(help="imagefolder, stl10 or cifar10; default: from the layout")
                       ] = None,
    resolution: Annotated[int | None, typer.Option(
        min=8, help="square side in pixels; default 224 for ImageFolder, the native size for STL-10/CIFAR-10")] = None,
    quality: Annotated[int, typer.Option(min=50, max=100, help="JPEG quality of the stored images")] = 90,
    shard_size: Annotated[int, typer.Option(min=1, help="images per shard (one Ray task each)")] = 1000,
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="existing Ray cluster: auto or "
                                                 "ray://host:10001 (none: a local instance, on loopback)")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for a local Ray instance (default: all)")] = None,
    images: Annotated[int | None, typer.Option(min=16, help="synthetic_shapes only: training images (default "
                                               "8000; the test split is 1/8 of it)")] = None,
) -> None:
    """Convert a data set once into Parquet shards + manifest.json, in parallel Ray tasks; a rerun keeps
    the shards that are complete and verified and makes the rest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mae_search.data.prepare import plan_shards, settings_for
    from mae_search.data.prepare import prepare as prepare_set
    from mae_search.search.cluster import init_ray
    from mae_search.storage import Location, check_writable

    try:
        settings = settings_for(source, dataset, resolution, quality, images)
        kind, root = settings.kind, settings.root
        target = Location.of(out)
        check_writable(target)
        classes, plans = plan_shards(settings, shard_size)
    except ValueError as exc:
        _fail(str(exc))
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.split] = counts.get(plan.split, 0) + (len(plan.items) or plan.stop - plan.start)
    console.print(f"prepare {kind if root == kind else f'{kind} {root}'} -> {target}: {settings.resolution} px, "
                  + ", ".join(f"{split} {n}" for split, n in counts.items())
                  + f" images in {len(plans)} shards", highlight=False)
    console.print(init_ray(address, num_cpus), highlight=False)
    columns = (TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("shards", total=len(plans))
        summary = prepare_set(settings, target, classes, plans, lambda done, total: bar.update(task, completed=done))
    console.print(f"prepared {summary.images} images in {summary.shards} shards ({summary.reused} kept from an "
                  f"earlier run, {summary.shards - summary.reused} made); manifest: {summary.manifest}",
                  highlight=False)
    if summary.skipped:
        console.print(f"[yellow]{len(summary.skipped)} unreadable image(s) skipped[/] (listed in the manifest):",
                      highlight=False)
        for item in summary.skipped[:10]:
            console.print(f"  {item['path']}: {item['error']}", highlight=False, soft_wrap=True)


@app.command()
def ui(
    storage: Annotated[str, typer.Option(help="results root whose embedded MLflow store to browse")] = "results",
    tracking_uri: Annotated[str | None, typer.Option(help="another MLflow store instead")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
    workers: Annotated[int, typer.Option(help="server worker processes (one is enough for one user)")] = 1,
    wait_s: Annotated[float, typer.Option(help="how long to wait for the server to answer")] = 300.0,
) -> None:
    """Start the MLflow UI on the embedded store (or --tracking-uri); prints its URL once it answers."""
    from mae_search.search.tracking import default_tracking_uri, require_store, serve_ui

    uri = tracking_uri or default_tracking_uri(storage)
    try:
        require_store(uri)
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"starting the MLflow UI for {uri} ...", highlight=False)

    def ready(url: str) -> None:
        console.print(f"MLflow UI: {url}  (Ctrl-C to stop; runs are under Experiments > "
                      f"<search name>; if it opens on another view, click Experiments)", highlight=False)

    try:
        serve_ui(uri, host, port, workers, wait_s, ready)
    except ValueError as exc:
        _fail(str(exc))


def _parse_assignment(text: str) -> tuple[str, object]:
    from mae_search.config import read_yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), read_yaml(value, f"--set {text!r}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
