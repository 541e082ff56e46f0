"""Where a search's files live: a local directory or an object store, through pyarrow filesystems.

``--storage`` is a local path (or a shared filesystem mounted on every node)
or an object-store URI such as ``s3://bucket/prefix``, resolved the way Ray
Train and Tune resolve theirs (``pyarrow.fs.FileSystem.from_uri``), so the
same credentials and endpoint settings serve Ray's checkpoints and this
project's files: the standard ``AWS_*`` variables, with ``AWS_ENDPOINT_URL``
for an S3-compatible server (MinIO, Ceph, moto).

Everything a search records goes there: Tune's experiment state, the trials'
checkpoints, the results table, the space, plan and ASHA records, and (with
the embedded MLflow store) MLflow's artifacts. Two files are SQLite databases,
which need a local disk: the Optuna study and the embedded MLflow store live
in :func:`local_dir`, a local mirror of the storage. They are copied to the
storage after every trial and brought back when the mirror lacks them
(:class:`mae_search.search.search_dir.SearchDir`), so a search resumed on
another machine continues its sampler's history and its MLflow runs. The
embedded store serves one machine at a time; searches run from several
machines at once should share an MLflow server (``--tracking-uri``).

:class:`Location` is a small path-like view (``/``, ``read_bytes``,
``write_text``, ``glob`` ...) so the code that reads and writes a search's
files is the same for both kinds.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

MLFLOW_DB = "mlflow.db"  # the embedded MLflow store, one per storage
LOCAL_TYPES = ("local", "py")  # Ray wraps local storage in a Python filesystem; its paths are local paths


class StorageError(ValueError):
    """Storage that cannot be used (unknown scheme, missing bucket, no credentials), as one line."""


def is_uri(where: str | Path) -> bool:
    """An object-store URI (``s3://``, ``gs://`` ...), as opposed to a local or mounted path."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


class Location:
    """One file or directory in a local directory or an object store; immutable, picklable."""

    __slots__ = ("fs", "path", "scheme")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "") -> None:
        self.fs, self.path, self.scheme = fs, path.rstrip("/") or "/", scheme

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        """A path (``~`` expanded, made absolute), a ``file://`` URI, or an object-store URI."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if not is_uri(text):
            local = Path(text.removeprefix("file://")).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), str(local))
        scheme = text.split("://", 1)[0]
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad URI
            raise StorageError(f"storage {text}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        return cls(fs, path, scheme)

    @classmethod
    def in_filesystem(cls, fs: pafs.FileSystem, path: str) -> Location:
        """A path inside a filesystem Ray handed over (a Train checkpoint's ``filesystem`` and ``path``)."""
        kind = fs.type_name
        return cls(pafs.LocalFileSystem(), path) if kind in LOCAL_TYPES else cls(fs, path, kind)

    # -------------------------------------------------------------- path-like
    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rsplit("/", 1)[0] or "/", self.scheme)

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path) == (other.scheme, other.path)

    def __lt__(self, other: Location) -> bool:
        return self.path < other.path

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    @property
    def local_path(self) -> Path:
        """The local path; only for local storage (SQLite files, logs)."""
        if not self.is_local:
            raise StorageError(f"{self}: not a local path")
        return Path(self.path)

    # -------------------------------------------------------------- queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def _entries(self) -> list[pafs.FileInfo]:
        if not self.is_dir():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))

    def iterdir(self) -> list[Location]:
        """The entries directly under this directory, sorted (none if it is not a directory)."""
        return sorted(Location(self.fs, info.path, self.scheme) for info in self._entries())

    def glob(self, pattern: str) -> list[Location]:
        """Entries matching ``pattern``, sorted; each ``/``-separated part matches one level (``*/x.json``)."""
        first, _, rest = pattern.partition("/")
        infos = [i for i in self._entries() if fnmatch.fnmatchcase(i.base_name, first)]
        if rest:
            infos = [i for i in infos if i.type == pafs.FileType.Directory]
        matches = sorted(Location(self.fs, i.path, self.scheme) for i in infos)
        return [found for m in matches for found in m.glob(rest)] if rest else matches

    # -------------------------------------------------------------- reading and writing
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: a reader sees the old or the new content, never a mix (a local file is
        written beside and renamed; an object-store object only appears once its upload completes)."""
        if self.is_local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create the directory and its parents (object stores have no directories: nothing to do)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def unlink(self) -> None:
        """Delete the file if it exists."""
        if self.is_file():
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete the directory and everything under it, if it exists."""
        if self.is_dir():
            self.fs.delete_dir(self.path)

    def open_input(self) -> io.BytesIO:
        """The file's bytes as a seekable buffer (what torch.load and pandas want)."""
        return io.BytesIO(self.read_bytes())

    def upload_dir(self, source: Path, last: str | None = None) -> None:
        """Copy a local directory's files here; ``last`` (a file name) is written after all the others, so
        a directory without it is known to be incomplete. Locally, the directory appears whole or not at
        all (written beside, then renamed)."""
        if self.is_local:
            final = Path(self.path)
            staging = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            return
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        for f in sorted(files, key=lambda p: p.name == last):  # False sorts first: `last` goes last
            (self / f.relative_to(source).as_posix()).write_bytes(f.read_bytes())

    @contextmanager
    def as_local_file(self) -> Iterator[Path]:
        """The file as a local path (downloaded to a temporary file when it is in an object store)."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / self.name
            local.write_bytes(self.read_bytes())
            yield local


def check_writable(storage: Location) -> None:
    """Fail in one line, before Ray starts, when an object store cannot be written (no such bucket, no
    credentials, an endpoint that does not answer), rather than with Ray's traceback minutes later."""
    if storage.is_local:
        return
    probe = storage / ".mae-search-write-check"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise StorageError(f"storage {storage} cannot be written: {reason}") from None


def local_dir(storage: Location) -> Path:
    """Where the files that need a local disk (SQLite: the Optuna study, the embedded MLflow store, and
    the driver's log) live: the storage itself when it is local, else a mirror under the user's cache
    directory (``$XDG_CACHE_HOME/mae-search/<scheme>/<bucket>/<prefix>``)."""
    if storage.is_local:
        return storage.local_path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mae-search" / storage.scheme / storage.path.lstrip("/")


def mlflow_db(storage: Location) -> Path:
    """The embedded MLflow store of a storage (one per storage, shared by its searches)."""
    return local_dir(storage) / MLFLOW_DB
