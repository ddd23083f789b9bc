"""`edgeq` run as its users run it, in a fresh process, for tests that check a command's output and exit status."""

from __future__ import annotations

import subprocess
import sys


def edgeq(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """`python -m edgeq.cli ARGS`; with `check`, a failure raises with the command and its stderr's tail."""
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeq {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r
