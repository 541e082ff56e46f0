"""What a person sees in an 80-column terminal: the live view of a search, its final table and
`mae-search list`, captured from a real tmux pane."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ASHA_BLR_BODY, micro_space

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def run_in_tmux(tmp_path, command: str, timeout_s: float = 600) -> str:
    """Run ``command`` in a detached 80x60 tmux pane (its own server) and return the whole screen."""
    socket = f"mae-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    marker = "__COMMAND_EXITED__"
    script = tmp_path / "screen.sh"
    script.write_text(f"cd {os.getcwd()}\n{command}\necho {marker}=$?\nsleep 3600\n")
    subprocess.run([*tmux, "new-session", "-d", "-s", "screen", "-x", "80", "-y", "60", f"bash {script}"],
                   check=True, env={**os.environ, "TERM": "xterm-256color"})
    try:
        deadline = time.time() + timeout_s
        screen = ""
        while time.time() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-400", "-t", "screen"],
                                    capture_output=True, text=True).stdout
            if marker in screen:
                break
            time.sleep(1)
        (tmp_path / "screen.txt").write_text(screen)
        assert f"{marker}=0" in screen, screen[-3000:]
        return screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_search_and_list_fit_80_columns(tmp_path):
    space = micro_space(tmp_path, "screen", ASHA_BLR_BODY.format(num_samples=3))
    storage = tmp_path / "results"
    cli = f"{sys.executable} -m mae_search.cli"
    screen = run_in_tmux(tmp_path, f"{cli} search {space} --storage {storage} --num-cpus 2 && "
                                   f"{cli} list --storage {storage}")
    lines = screen.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in screen and "Traceback" not in screen
    # The project's view, not Ray's reporter or its per-trial dumps.
    assert "Trial status:" not in screen and "Trial run_trial_" not in screen and "RayTrainWorker" not in screen
    assert "3 / 3 trials done" in screen
    assert "blr=0.005 seed=0" in screen and "blr=1e-07 seed=0" in screen
    assert "stopped" in screen and "completed" in screen
    # The final table ranks completed trials first, and `list` shows the counts.
    assert "completed trials first" in screen
    assert "planned" in screen and "screen" in lines[-5] + "".join(lines[-30:])
