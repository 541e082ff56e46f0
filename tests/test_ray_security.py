"""A local search's Ray instance refuses callers without the user's token (its listeners bind every
interface in Ray 2.60, so the token is what keeps other machines out)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

START_LOCAL = textwrap.dedent("""
    import os, subprocess, sys
    import ray
    from mae_search.ray_search import init_ray
    init_ray(None, 1)
    join = "import sys, ray; ray.init(address=sys.argv[1]); print('JOINED')"
    for mode in ("disabled", "token"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        out = subprocess.run([sys.executable, "-c", join, ray.get_runtime_context().gcs_address],
                             env={**env, "RAY_AUTH_MODE": mode}, capture_output=True, text=True, timeout=120)
        print(mode, "JOINED" in out.stdout, "InvalidAuthToken" in out.stderr)
    ray.shutdown()
""")


def test_a_local_instance_refuses_a_caller_without_the_token():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", START_LOCAL], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "disabled False True" in lines, out.stdout + out.stderr[-2000:]  # refused, for want of the token
    assert "token True False" in lines, out.stdout + out.stderr[-2000:]  # the same client with it joins
    assert (Path.home() / ".ray" / "auth_token").stat().st_size > 0  # made by the first local instance
