"""MLflow set-up: which store a search logs to, checked before Ray starts, and the UI to browse it.

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the
embedded SQLite store of the storage (no server needed). A tracking server that
cannot be reached, or a mistyped store path, is reported in one line before the
search starts. HTTP retries are bounded (``HTTP_DEFAULTS``): a server that went
away mid-search costs seconds, not minutes per call. What is logged, and how,
is :mod:`mae_search.search.mlflow_runs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from mae_search.config import TrainConfig
from mae_search.storage import Location, mlflow_db

# MLflow's own defaults retry a dead server for about 4 minutes per call (7 retries with backoff, 120 s
# timeouts). Bounded here, unless the user set them: a tracking server that went away costs seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(ValueError):
    """MLflow cannot be used as configured; one line naming the URI."""


def default_tracking_uri(storage: str | Path | Location) -> str:
    """The embedded store: a SQLite file beside the search results (no server needed), or in the local
    mirror of an object store (SQLite needs a local disk; its artifacts still go to the object store)."""
    return f"sqlite:///{mlflow_db(Location.of(storage))}"


def resolve_tracking_uri(cli_uri: str | None, storage: str | Path | Location) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store under ``storage``."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not after an hour of training) if the tracking store is unusable."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason})") from None
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme and scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"MLflow tracking URI {uri}: unknown scheme '{scheme}' (MLflow takes "
                            f"{', '.join(sorted(KNOWN_SCHEMES))})")
    if scheme and scheme not in ("sqlite", "file"):
        return  # databases and databricks are checked by the first client call
    local = Path(uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:"))
    if not local.parent.is_dir():  # MLflow would create the directories of a mistyped path
        problem = "is not a directory" if local.parent.exists() else "does not exist"
        raise TrackingError(f"MLflow tracking store {uri}: {local.parent} {problem}")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {exc})") from None


KNOWN_SCHEMES = frozenset({"http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks",
                           "databricks-uc", "uc"})


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten_config(cfg: TrainConfig) -> dict[str, str]:
    """Dotted keys -> strings, the form MLflow params take."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("mae-search", "torch", "torchvision", "ray", "optuna", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[f"version.{pkg}"] = metadata.version(pkg)
    return out


# The tracking store of the driver process now running, set by the CLI before each run (None: MLflow off).
# Tune pickles its callbacks with the experiment and restores them on --resume; reading the store from
# here at setup (not from the pickled instance) makes --tracking-uri and --no-mlflow given on resume
# take effect.
_ACTIVE: dict[str, Any] = {"configured": False, "uri": None}


def configure_tracking(uri: str | None) -> None:
    """Where this driver process logs (None: not at all); read by every MLflowSearchCallback at setup."""
    _ACTIVE.update(configured=True, uri=uri)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)




def active_uri() -> tuple[bool, str | None]:
    """(whether the CLI configured this process, the store it logs to)."""
    return _ACTIVE["configured"], _ACTIVE["uri"]


def require_store(uri: str) -> None:
    """An embedded store to browse must exist (MLflow would create an empty one at a mistyped path)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: run a search first, or pass "
                            "--storage DIR (the --storage the search used) or --tracking-uri")


def serve_ui(uri: str, host: str, port: int, workers: int, wait_s: float, on_ready: Callable[[str], None]) -> None:
    """Run ``mlflow ui`` on ``uri`` until it exits or Ctrl-C; ``on_ready(url)`` once it answers.

    A plain kill of this process stops the server too. Raises TrackingError in one line when the
    server exits (port in use) or does not answer within ``wait_s``.
    """
    url = f"http://{host}:{port}"
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]
    server = subprocess.Popen(args)

    def stop(signum: int, frame: object) -> None:
        server.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise TrackingError(f"the MLflow UI exited with code {server.returncode} (is port {port} in "
                                        "use? try --port)") from None
                if time.monotonic() > deadline:
                    server.terminate()
                    raise TrackingError(f"the MLflow UI did not answer at {url} within {wait_s:.0f} s") from None
                time.sleep(0.5)
        on_ready(url)
        server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
