"""A bundle that runs on an arm64 device with nothing installed: `bin/edgeq-run` and a `run` script.

`adb push out/ /data/local/tmp/m && adb shell /data/local/tmp/m/run "The capital of France is"`: the runner is a
static aarch64 executable (edgeq/native/), so neither Python nor a shared library is needed on the phone; the
script is POSIX sh (Android's /system/bin/sh runs it). Both are artifacts: listed and hashed in the manifest, and
the runner checks every artifact's SHA-256, its own included, before llama.cpp opens the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from edgeq.bundle.manifest import Artifact
from edgeq.core.errors import EdgeqError
from edgeq.native.runner import RUNNER_NAME, NativeRunner, build_runner

BIN = "bin"
LAUNCHER = "run"
BACKEND = "native"       # not a model backend: budgets count model files only
# the shell a device's kernel starts the script with
SHELLS = {"android": "/system/bin/sh"}
USAGE = f"{LAUNCHER} TEXT [--max-tokens N] | {LAUNCHER} --chat | {LAUNCHER} --json | {LAUNCHER} --verify-only"


def native_runner(requested: bool | None, profile, target, kind: str,
                  log: Callable[[str], None] = lambda s: None) -> NativeRunner | None:
    """The runner the bundle gets (built now if not cached, so a missing toolchain fails before the passes run):
    as asked, else wherever the profile and backend have one; a request that cannot be met is refused."""
    if requested is None:
        requested = profile.native_march is not None and kind in target.native_kinds
    if not requested:
        return None
    if requested and profile.native_march is None:
        raise EdgeqError(None, f"--native: the {profile.name} profile has no native runner (android and linux-arm64 "
                               "have one)")
    if requested and kind not in target.native_kinds:
        raise EdgeqError(None, f"--native: no native runner for {kind}s on the {target.name} backend yet (gguf "
                               "decoders have one; drop --native to keep this backend's Python runtime)")
    return build_runner(profile.native_march, log=log)


def launcher_script(os_name: str) -> str:
    shell = SHELLS.get(os_name, "/bin/sh")
    return f"""#!{shell}
# Runs this edgeq bundle with its native runner; nothing else needs to be installed.
#   ./run "The capital of France is"      continue a prompt (greedy)
#   ./run --chat                           chat, one message a line      ./run --json   reference outputs + timings
#   ./run --verify-only                    check every file's SHA-256    ./run --help   all options
d=$(cd "$(dirname "$0")" && pwd) || exit 1
r="$d/{BIN}/{RUNNER_NAME}"
[ -x "$r" ] || chmod 755 "$r" 2>/dev/null
case "$1" in
  ""|-*) exec "$r" --bundle "$d" "$@" ;;
  *) p=$1; shift; exec "$r" --bundle "$d" --prompt "$p" "$@" ;;
esac
"""


def add_native(folder: Path, profile, runner: NativeRunner, backend: str) -> tuple[list[Artifact], dict]:
    """Copy the runner into `folder`/bin and write the launcher; their artifacts and the manifest's `native`
    section."""
    (folder / BIN).mkdir()
    exe = folder / BIN / RUNNER_NAME
    shutil.copyfile(runner.path, exe)
    exe.chmod(0o755)
    notices = folder / BIN / runner.licences.name
    shutil.copyfile(runner.licences, notices)
    script = folder / LAUNCHER
    script.write_text(launcher_script(profile.os), encoding="utf-8")
    script.chmod(0o755)
    section: dict[str, Any] = {
        "runner": f"{BIN}/{RUNNER_NAME}", "launcher": LAUNCHER, "runs": backend, **runner.to_json(),
        "usage": USAGE,
        "verifies": "every artifact's size and SHA-256 before loading (llama.cpp's vendored public-domain SHA-256)",
    }
    return [Artifact("runner", exe, BACKEND, rel=f"{BIN}/{RUNNER_NAME}"),
            Artifact("licences", notices, BACKEND, rel=f"{BIN}/{notices.name}"),
            Artifact("launcher", script, BACKEND)], section
