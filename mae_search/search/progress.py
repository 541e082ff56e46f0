"""The live view of a search in the terminal, in place of Ray Tune's reporter.

One line per trial -- its searched values, epoch out of the search's epochs,
latest objective (mean ± std over seeds when seed-averaged) and status --
under "k / N trials done, elapsed, ETA". It is drawn from Tune's callback
events on the driver, fits the terminal's width (columns fold, never "…"),
and on a terminal that is not interactive (CI logs, a pipe) prints one line
per finished trial instead of redrawing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mae_search.metrics import metric
from mae_search.search.record import Status, TrialRecord
from mae_search.search.results import by_configuration, final_rows, read_results
from mae_search.search.search_dir import SearchDir
from mae_search.search.space import SearchSpace


@dataclass
class TrialLine:
    label: str
    epoch: int = 0
    value: float | None = None
    std: float | None = None
    status: str = "running"
    recorded: bool = False  # finished before this run of the search (a resumed one): not in its pace


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


_SHOWN: list[SearchProgress] = []  # the view drawing now (a resumed search's is Tune's restored copy)


def stop_progress() -> None:
    """Close the live view (after Ctrl-C too), so what the CLI prints next starts on a clean line."""
    while _SHOWN:
        _SHOWN.pop().stop()


class SearchProgress(Callback):
    def __init__(self, space: SearchSpace, max_epochs: int, console: Console | None = None,
                 search_dir: SearchDir | None = None) -> None:
        self.space = space
        self.max_epochs = max_epochs
        self.console = console
        self.search_dir = search_dir
        self.lines: dict[str, TrialLine] = {}
        self.started = time.monotonic()
        self._live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment: the terminal handles stay behind.
        return {**self.__dict__, "console": None, "_live": None}

    # ----------------------------------------------------------------- Tune events

    def setup(self, **info: Any) -> None:
        self.console = self.console or Console()
        self.started = time.monotonic()
        self.lines.update(self._recorded())
        if self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
            _SHOWN.append(self)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = TrialRecord.for_trial(self.space, trial.trial_id, dict(trial.config))[0]
        label = record.label(with_seed=not self.space.seed_averaged)
        self.lines.setdefault(trial.trial_id, TrialLine(label=label)).status = "running"
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        line = self.lines.setdefault(trial.trial_id, TrialLine(label=trial.trial_id))
        line.epoch = max(line.epoch, int(result.get("epoch", 0)))
        metric = self.space.primary.metric
        if result.get(metric) is not None:
            line.value, line.std = float(result[metric]), result.get(f"{metric}_std")
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        line = self.lines.setdefault(trial.trial_id, TrialLine(label=trial.trial_id))
        line.status = "completed" if line.epoch >= self.max_epochs else f"stopped at {line.epoch}"
        self._ended(line)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        line = self.lines.setdefault(trial.trial_id, TrialLine(label=trial.trial_id))
        line.status = "failed"
        self._ended(line)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
            self._live = None

    def _recorded(self) -> dict[str, TrialLine]:
        """The trials a resumed search finished before (from its results table), so that its count goes
        on from them: Tune re-runs only the unfinished ones and sends no events for the rest."""
        search_dir = getattr(self, "search_dir", None)  # a view pickled by an older version has none
        if search_dir is None or not search_dir.results.is_file():
            return {}
        metric_name = self.space.primary.metric
        lines = {}
        for _, row in by_configuration(final_rows(read_results(search_dir.results)), metric_name).iterrows():
            if row["status"] not in (Status.COMPLETED, Status.STOPPED, Status.FAILED):
                continue
            record = TrialRecord.from_row(row.to_dict())
            status = {Status.COMPLETED: "completed", Status.FAILED: "failed"}.get(
                Status(row["status"]), f"stopped at {int(row['epoch'])}")
            value, std = (row.get(key) for key in (metric_name, f"{metric_name}_std"))
            lines[row["tune_trial_id"]] = TrialLine(
                label=record.label(with_seed=not self.space.seed_averaged), epoch=int(row["epoch"]),
                value=None if pd.isna(value) else float(value), std=None if pd.isna(std) else float(std),
                status=status, recorded=True)
        return lines

    # ----------------------------------------------------------------- drawing

    def _ended(self, line: TrialLine) -> None:
        if self._live is None and self.console is not None:  # not a terminal: a line per finished trial
            self.console.print(f"[{self.done()}/{self.space.total_trials()}] {line.label}: {line.status}, "
                               f"{metric(self.space.primary.metric).label} {self._value(line)}  ({self.summary()})",
                               highlight=False, soft_wrap=True)
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.render())

    def done(self) -> int:
        return sum(line.status not in ("running", "pending") for line in self.lines.values())

    def eta_s(self) -> float | None:
        """Seconds left if every unfinished trial runs all its epochs at the pace so far (ASHA makes it less)."""
        epochs_done = sum(line.epoch for line in self.lines.values() if not line.recorded)
        if not epochs_done:
            return None
        running = sum(self.max_epochs - line.epoch for line in self.lines.values() if line.status == "running")
        not_started = max(0, self.space.total_trials() - len(self.lines)) * self.max_epochs
        return (time.monotonic() - self.started) / epochs_done * (running + not_started)

    def summary(self) -> str:
        eta = self.eta_s()
        left = "ETA -" if eta is None else f"ETA ≤ {fmt_duration(eta)}"
        return (f"{self.done()} / {self.space.total_trials()} trials done, "
                f"{fmt_duration(time.monotonic() - self.started)} elapsed, {left}")

    def _value(self, line: TrialLine) -> str:
        """In the unit the tables use (LP top-1 in %, losses as they are)."""
        if line.value is None:
            return "-"
        spec = metric(self.space.primary.metric)
        shown = f"{line.value * spec.scale:.{spec.digits}f}"
        return shown + (f" ± {line.std * spec.scale:.{spec.digits}f}" if line.std is not None else "")

    def render(self) -> Table:
        objective = f"{self.space.primary.mode} {metric(self.space.primary.metric).label}"
        table = Table(title=f"search {self.space.name}", caption=self.summary(), expand=False)
        table.add_column("trial", overflow="fold")
        table.add_column("epoch", justify="right", no_wrap=True)
        table.add_column(objective, justify="right", overflow="fold")
        table.add_column("status", overflow="fold")
        for line in self.lines.values():
            table.add_row(line.label, f"{line.epoch}/{self.max_epochs}", self._value(line), line.status)
        return table
