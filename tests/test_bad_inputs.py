"""The bad-input corpus: every file and command line in tests/bad_inputs must be refused with one line
(and nothing else printed) naming the file (and the key, where there is one), no traceback, before Ray
starts, writing nothing outside the storage directory.

A space file's first line says what its error must contain: ``# expect: <text>``. ``commands.txt``
holds ``<expected text> | <mae-search arguments>``, where ``{corpus}`` is tests/bad_inputs.
"""

import shlex
import subprocess
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from mae_search.cli import app
from mae_search.config import ConfigError
from mae_search.search.space import load_search_space

CORPUS = Path(__file__).parent / "bad_inputs"
SPACES = sorted((CORPUS / "spaces").glob("*.yaml"))
COMMANDS = [line for line in (CORPUS / "commands.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <text>'"
    return first.removeprefix("# expect: ")


def test_the_corpus_is_large_enough():
    assert len(SPACES) + len(COMMANDS) >= 80


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_bad_space_file_is_one_line_naming_file_and_key(path):
    with pytest.raises(ConfigError) as exc:
        load_search_space(path)
    message = str(exc.value)
    assert "\n" not in message and len(message) < 1000, message[:2000]
    assert message.startswith(f"{path}: "), message
    assert expected(path) in message, message


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _repo_state() -> str:
    repo = Path(__file__).parent.parent
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                          capture_output=True, text=True).stdout


@pytest.mark.parametrize("line", COMMANDS, ids=[c.split("|", 1)[1].strip()[:60] for c in COMMANDS])
def test_bad_command_is_one_line_before_ray_starts(line, tmp_path, monkeypatch):
    want, args = (part.strip() for part in line.split("|", 1))
    argv = [a.replace("{corpus}", str(CORPUS)) for a in shlex.split(args)]
    monkeypatch.chdir(tmp_path)
    before_repo = _repo_state()
    result = CliRunner().invoke(app, argv)
    output = result.output
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2, output
    assert len(errors) == 1 and want in errors[0], output
    assert [ln for ln in output.splitlines() if ln.strip()] == errors, "lines besides the error:\n" + output
    assert "Traceback" not in output
    assert not ray.is_initialized()
    outside = {p for p in _files(tmp_path) if not p.is_relative_to(tmp_path / "results")}
    assert not outside, f"written outside the storage directory: {sorted(map(str, outside))}"
    assert _repo_state() == before_repo
