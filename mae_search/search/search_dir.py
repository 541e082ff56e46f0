"""Every file of one search, in one place: ``<storage>/<search name>/`` and its local mirror.

A search's record is spread over files that different parts of the package write:
the space as run (what ``--resume``, ``list`` and ``report`` read), the concurrency
it was planned with, the results table, ASHA's rungs, MLflow's run ids, the seeds'
checkpoints (``train_runs/``), Tune's experiment state, and two SQLite files (the
Optuna study and the storage's embedded MLflow store) that need a local disk. With
an object store as storage those live in a local mirror (:func:`mae_search.storage.local_dir`)
and are copied beside the rest after every trial, so a search resumed on another
machine continues them. :class:`SearchDir` names each of them once, for local and
object-store storage alike; nothing else builds ``storage / name`` paths.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mae_search.storage import MLFLOW_DB, Location, local_dir, mlflow_db

SPACE_FILE = "search_space.json"  # the validated space as run
PLAN_FILE = "plan.json"  # the concurrency the search was planned with
RESULTS_FILE = "results.parquet"  # one row per trial-epoch: TrialRecord.to_row()
ASHA_FILE = "asha_rungs.json"  # ASHA's rungs, so a resumed search continues them
MLFLOW_STATE_FILE = "mlflow_runs.json"  # parent and child run ids, so a resumed search continues its runs
OPTUNA_DB = "optuna.db"  # the persisted Optuna study
DRIVER_LOG = "ray-driver.log"  # Ray's driver-side log records (Tune, Train), kept off the terminal
TRAIN_RUNS_DIR = "train_runs"  # one run directory per trial and seed (checkpoints)


@dataclass(frozen=True)
class SearchDir:
    """One search's files: ``storage`` (a local directory or an object store) and the search's name."""

    storage: Location
    name: str

    @classmethod
    def of(cls, storage: str | Path | Location, name: str) -> SearchDir:
        return cls(Location.of(storage), name)

    @classmethod
    def at(cls, path: str | Path | Location | SearchDir) -> SearchDir:
        """The search whose directory is ``path`` (``<storage>/<name>``)."""
        if isinstance(path, SearchDir):
            return path
        where = Location.of(path)
        return cls(where.parent, where.name)

    @property
    def root(self) -> Location:
        return self.storage / self.name

    def __str__(self) -> str:
        return str(self.root)

    # ----------------------------------------------------------------- files in the storage
    @property
    def space_file(self) -> Location:
        return self.root / SPACE_FILE

    @property
    def plan_file(self) -> Location:
        return self.root / PLAN_FILE

    @property
    def results(self) -> Location:
        return self.root / RESULTS_FILE

    @property
    def asha_file(self) -> Location:
        return self.root / ASHA_FILE

    @property
    def mlflow_state(self) -> Location:
        return self.root / MLFLOW_STATE_FILE

    @property
    def train_runs(self) -> Location:
        """Where the seeds' run directories (their checkpoints) live, whichever runner trains them."""
        return self.root / TRAIN_RUNS_DIR

    @property
    def tune_started(self) -> bool:
        """Whether Tune has written its experiment state: a search interrupted before that (in its
        pre-flight or reference rows) has no trial to restore and is resumed by starting Tune anew."""
        return bool(self.root.glob("experiment_state-*.json"))

    # ----------------------------------------------------------------- files on a local disk
    @property
    def local(self) -> Path:
        """The search's folder on this machine: the search directory itself, or its local mirror."""
        return local_dir(self.storage) / self.name

    @property
    def optuna_db(self) -> Path:
        return self.local / OPTUNA_DB

    @property
    def optuna_url(self) -> str:
        """Open it with ``optuna-dashboard URL`` or ``optuna.load_study``."""
        return f"sqlite:///{self.optuna_db}"

    @property
    def mlflow_db(self) -> Path:
        return mlflow_db(self.storage)

    @property
    def driver_log(self) -> Path:
        return self.local / DRIVER_LOG

    # ----------------------------------------------------------------- the SQLite copies
    def sqlite_files(self) -> list[tuple[Path, Location]]:
        """The SQLite files the search uses, each with where its copy lives in the storage."""
        return [(self.mlflow_db, self.storage / MLFLOW_DB), (self.optuna_db, self.root / OPTUNA_DB)]

    def save_sqlite_copies(self) -> None:
        """Copy the SQLite files to the object store (nothing to do for local storage): a consistent
        snapshot (SQLite's backup API) even while MLflow's thread writes to its store."""
        if self.storage.is_local:
            return
        for local, remote in self.sqlite_files():
            if not local.is_file():
                continue
            with tempfile.TemporaryDirectory() as tmp:
                snapshot = Path(tmp) / local.name
                source, target = sqlite3.connect(local), sqlite3.connect(snapshot)
                try:
                    source.backup(target)
                finally:
                    source.close()
                    target.close()
                remote.write_bytes(snapshot.read_bytes())

    def restore_sqlite_copies(self) -> list[Path]:
        """Bring back the copies this machine's mirror lacks (a search resumed elsewhere); returns them."""
        restored = []
        for local, remote in ([] if self.storage.is_local else self.sqlite_files()):
            if not local.is_file() and remote.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(remote.read_bytes())
                restored.append(local)
        return restored
